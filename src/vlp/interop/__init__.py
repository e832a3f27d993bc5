"""Interoperability with other libraries' checkpoints (transformers, open_clip); see
`vlp.interop.pretrained` and docs/interop.md."""
