"""Watch the gradient noise scale of a Hugging Face ``Trainer`` run: one callback, nothing else changes.

A tiny Llama, built from its config (nothing is downloaded), learns bytes of the Python standard library's own
source with ``transformers.Trainer``.  ``NoiseScaleTrainerCallback`` measures B_simple at every optimizer step,
adds ``noisescale/b_simple`` and its band to the Trainer's logs (printed below every ``logging_steps``), and
records every step in a run store.  With ``gradient_accumulation_steps >= 2`` the micro-batches are the small
batches (almost free); with 1, the exact per-example norms.

Run:  python examples/hf_trainer.py [--steps 60] [--accumulate 4]
      (needs transformers: pip install 'noisescale[hf]')
"""

import argparse
import sys
import tempfile

import torch

import noisescale as ns
from noisescale.demo.charlm import load_corpus

try:
    import transformers

    from noisescale.integrations.huggingface import NoiseScaleTrainerCallback
except ImportError as e:
    sys.exit(f"examples/hf_trainer.py needs transformers: pip install 'noisescale[hf]' ({e})")


class ByteWindows(torch.utils.data.Dataset):
    """Windows of ``context`` bytes; the model learns to predict each next byte."""

    def __init__(self, data: torch.Tensor, context: int, count: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.data, self.context = data, context
        self.starts = torch.randint(0, len(data) - context, (count,), generator=g)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.data[self.starts[i] : self.starts[i] + self.context]
        return {"input_ids": ids, "labels": ids}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8, help="examples per micro-batch")
    ap.add_argument("--accumulate", type=int, default=4, help="gradient_accumulation_steps")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--runs", default="runs", help="folder of the run store")
    args = ap.parse_args()

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256,  # bytes
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=args.context,
    )
    model = transformers.LlamaForCausalLM(config)
    data = torch.frombuffer(bytearray(load_corpus()), dtype=torch.uint8).long()
    dataset = ByteWindows(data, args.context, count=args.steps * args.batch * args.accumulate)

    noise = NoiseScaleTrainerCallback(
        run=args.runs, run_name="hf-trainer", run_config=vars(args), sinks=[ns.alerts.default_rules()]
    )
    with tempfile.TemporaryDirectory() as out:
        training = transformers.TrainingArguments(
            output_dir=out,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=args.accumulate,
            learning_rate=3e-3,
            logging_steps=10,  # the Trainer's logs, with noisescale/b_simple and its band, every 10 steps
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,  # print the logs as lines
            use_cpu=True,
        )
        trainer = transformers.Trainer(model=model, args=training, train_dataset=dataset, callbacks=[noise])
        trainer.train()
    print(f"{noise.monitor.step_count} steps measured ({noise.monitor.source} source); run store {noise.run.path}")


if __name__ == "__main__":
    main()
