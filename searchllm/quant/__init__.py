"""llama.cpp's quantization types as levels of the search: what each type costs in bytes for a row length
(with llama.cpp's fallbacks), exact GGUF file sizes, and libggml's own quantizer through ctypes. Knows
nothing of Ray nor of the level database."""
