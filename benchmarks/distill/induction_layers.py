"""Per target layer and head, how much attention goes where copying needs it (induction score).

Feeds random token sequences repeated twice; on the second copy, a copying ("induction") head
attending from token x_p puts its weight on the position after x_p's first occurrence. The
drafter can only copy through the K/V it reads, so this says which layers hold keys it can match.
The second table asks the same of queries built from the token's embedding alone (the layer's
keys unchanged): what a drafter that sees only the pending token's embedding could form without
rebuilding the target's earlier layers.

    python -m benchmarks.distill.induction_layers --model embedded
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM


def induction_scores(
    model, vocab: int, *, sequences: int = 8, length: int = 64, seed: int = 0, embedding_queries: bool = False
) -> torch.Tensor:
    """(layers, heads): mean attention weight from each second-copy token to the position after its
    first occurrence; with `embedding_queries`, every layer's queries come from the normed token
    embeddings instead of its input."""
    hooks = []
    if embedding_queries:
        embed = model.get_input_embeddings()
        state = {}
        hooks.append(embed.register_forward_hook(lambda m, i, o: state.__setitem__("emb", o)))
        for layer in model.get_decoder().layers:
            hooks.append(layer.self_attn.q_proj.register_forward_pre_hook(lambda m, i, norm=layer.input_layernorm: (norm(state["emb"]),)))
    g = torch.Generator().manual_seed(seed)
    low = min(1000, vocab // 4)  # skip the special and byte tokens at the start of Gemma's vocabulary
    total = None
    for _ in range(sequences):
        half = torch.randint(low, vocab, (length,), generator=g)
        ids = torch.cat([half, half])[None]
        with torch.no_grad():
            attentions = model(ids, output_attentions=True).attentions
        q = torch.arange(length + 1, 2 * length)  # second-copy positions whose successor's first copy exists
        scores = torch.stack([a[0][:, q, q - length + 1].mean(-1) for a in attentions])
        total = scores if total is None else total + scores
    for h in hooks:
        h.remove()
    return total / sequences


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded", help="model dir or 'embedded' (the demo's Gemma 3 270M)")
    args = ap.parse_args()
    path = args.model
    if path == "embedded":
        from langchain_gemma_mtp.embedded import embedded_model_dir

        path = str(embedded_model_dir())
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    config = model.config.get_text_config()
    types = getattr(config, "layer_types", None) or ["?"] * config.num_hidden_layers
    for title, from_embedding in (("the layer's own queries", False), ("queries from the token embedding alone", True)):
        scores = induction_scores(model, config.vocab_size, embedding_queries=from_embedding)
        print(f"\n{title}\n")
        print("| layer | type | " + " | ".join(f"head {h}" for h in range(scores.shape[1])) + " |")
        print("|---|---|" + "---|" * scores.shape[1])
        for i, row in enumerate(scores.tolist()):
            print(f"| {i} | {types[i]} | " + " | ".join(f"{x:.2f}" for x in row) + " |")


if __name__ == "__main__":
    main()
