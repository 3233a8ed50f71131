"""What tests share and are not tests themselves: the repository's paths, end-to-end run helpers,
GGUF fixtures, an uncached decoding reference, the finetune case held to PyTorch's AdamW and a
multi-process checkpoint worker."""
