"""noisescale inside the training frameworks: one callback each, nothing else to change in the training code.

* ``noisescale.integrations.lightning.NoiseScaleCallback``: ``lightning.pytorch`` (``pip install
  'noisescale[lightning]'``);
* ``noisescale.integrations.huggingface.NoiseScaleTrainerCallback``: ``transformers.Trainer`` and the trainers built
  on it, such as TRL's (``[hf]``, ``[trl]``);
* ``noisescale.integrations.accelerate.AccelerateMonitor``: a loop of your own under ``accelerate``
  (``[accelerate]``).

Importing this package imports none of the frameworks; each module imports its own and raises an ``ImportError``
naming the extra when it is missing.  See docs/integrations.md.
"""
