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


def linear_shapes(shape: str = "llama2-7b", tp: int = 1) -> list[tuple[int, int, str]]:
    """(K, N, name) of one rank's decode linears at `tp`-way tensor parallelism, as the runtime fuses
    them: qkv, gate/up and the vocab-parallel lm_head split along N, o and down along K."""
    c = SHAPES[shape]
    hidden, inter = c["hidden_size"], c["intermediate_size"]
    head_dim = hidden // c["num_attention_heads"]
    qkv = (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * head_dim
    return [(hidden, qkv // tp, "qkv"), (hidden // tp, hidden, "o"), (hidden, 2 * inter // tp, "gate/up"),
            (inter // tp, hidden, "down"), (hidden, c["vocab_size"] // tp, "lm_head")]
