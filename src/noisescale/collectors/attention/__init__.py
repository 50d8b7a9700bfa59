"""``nn.MultiheadAttention`` per example: its projections run inside a function, found in the autograd graph.

``hooks`` installs the layer's hooks and turns each projection product into per-example norms; ``graph`` walks a
call's autograd graph to find the products; ``dispatch`` watches the first call's products being computed; and
``checks`` holds the two to the layout the hooks assume.
"""

from noisescale.collectors.attention.hooks import AttentionProjections, attention_param_names, unsupported_attention

__all__ = ["AttentionProjections", "attention_param_names", "unsupported_attention"]
