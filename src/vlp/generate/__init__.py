"""Text generation for any decoder with a step function: greedy, beam search, nucleus sampling.

A decoder plugs in through the `Decoder` protocol: `step(tokens, state)` takes the new tokens
(the whole prompt on the first call) and returns the next-token logits of the last position and
the new state (a key/value cache, the image tokens it attends to, ...); `reorder(state, index)`
selects or repeats batch rows (beams). The state is opaque to the search.
"""

from vlp.generate.search import Decoder, Recomputing, beam_search, generate, greedy, nucleus

__all__ = ["Decoder", "Recomputing", "beam_search", "generate", "greedy", "nucleus"]
