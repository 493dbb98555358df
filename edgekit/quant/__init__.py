"""Weight quantization: encodings (:mod:`.encodings`), GGUF lossless import (:mod:`.gguf_blocks`), codecs that
emit quantized graph nodes (:mod:`.codec`), and activation-aware scaling (:mod:`.awq`)."""
