import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hwopt.model.checkpoint import parent_from_hf_state
from hwopt.plugins import block_types


def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=101, max_position_embeddings=128, head_dim=16)
    return cfg, LlamaForCausalLM(cfg).eval()

def test_parent_logits_match():
    cfg, hf = tiny()
    ours = parent_from_hf_state(cfg, hf.state_dict(), block_types())
    ids = torch.randint(0, 101, (2, 17))
    with torch.no_grad():
        a, b = hf(ids).logits, ours(ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0)
