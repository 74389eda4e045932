"""Published configs of the models the benches build with random weights (torch-free: the CLI lists them)."""

SHAPES = {
    "llama2-7b": dict(arch="llama", hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                      num_key_value_heads=32, num_hidden_layers=32, vocab_size=32000, max_position_embeddings=4096),
    "llama3-8b": dict(arch="llama", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, num_hidden_layers=32, vocab_size=128256, max_position_embeddings=8192,
                      rope_theta=500000.0),
    "internlm2.5-7b": dict(arch="internlm2", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                           num_key_value_heads=8, num_hidden_layers=32, vocab_size=92544,
                           max_position_embeddings=32768, rope_theta=1000000.0),
    "qwen2.5-1.5b": dict(arch="qwen2", hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
                         num_key_value_heads=2, num_hidden_layers=28, vocab_size=151936,
                         max_position_embeddings=32768, rope_theta=1000000.0),
}
