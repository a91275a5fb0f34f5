"""Chapter 03: one typical mistake per exercise, keyed by its check's name; each must fail its check with a message
(tests/test_exercises.py). Each source defines the exercise's function, written wrong."""

MISTAKES = {
    # 03: the patches averaged away as in the global mapper; the gate normalised over the whole batch;
    # the local branch added without its gate
    "local_tokens": """
def local_tokens(local_mapper, levels, mask):
    import torch
    import torch.nn.functional as F
    per_level = [local_mapper.mapping[i](level[:, :1]) + local_mapper.mapping_patch[i](level[:, 1:]).mean(1, keepdim=True)
                 for i, level in enumerate(levels)]
    tokens = torch.stack(per_level).mean(0).expand(-1, levels[0].shape[1] - 1, -1)
    side = int(tokens.shape[1] ** 0.5)
    grid = F.interpolate(mask[:, None].float(), size=(side, side), mode="nearest").flatten(1)
    return tokens * grid[..., None]
""",
    "local_gate": """
def local_gate(probs, primary_index):
    index = primary_index.view(-1, 1, 1, 1).expand(-1, probs.shape[1], probs.shape[2], 1)
    gate = probs.gather(-1, index)
    return gate / gate.max()
""",
    "elite_cross_attention": """
def elite_cross_attention(attn, hidden_states, context, to_k, to_v, local_tokens, to_k_local, to_v_local,
                          primary_index, scale, rows):
    batch, pixels, _ = hidden_states.shape
    head_dim = attn.to_q.out_features // attn.heads

    def heads(x):
        return x.view(len(x), -1, attn.heads, head_dim).transpose(1, 2)

    query, key, value = heads(attn.to_q(hidden_states)), heads(to_k(context)), heads(to_v(context))
    out = (query @ key.transpose(-1, -2) * attn.scale).softmax(dim=-1) @ value
    local_key, local_value = heads(to_k_local(local_tokens)), heads(to_v_local(local_tokens))
    local_probs = (query[rows] @ local_key.transpose(-1, -2) * attn.scale).softmax(dim=-1)
    out = out.index_add(0, rows, scale * (local_probs @ local_value))
    out = out.transpose(1, 2).reshape(batch, pixels, attn.heads * head_dim)
    return attn.to_out[1](attn.to_out[0](out))
""",
}
