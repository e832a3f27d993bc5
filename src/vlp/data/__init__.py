"""Data: the shapes world, readers for real data formats, transforms, tokenizer, collate."""
