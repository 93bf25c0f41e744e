"""PyTorch references for the analysis tests, written from the original code's definitions
(amazon-science/llm-interpret: ``BaseLM.calculate_importance`` in ``lm_eval/base.py`` and
``lm_eval/prefix_matching_copying.py``), run on ``transformers.GPT2LMHeadModel`` in a separate
process (Jittor and torch each bring their own MKL).

Usage: ``python analysis_ref.py MODE IN.json OUT.json`` with MODE ``importance``, ``copying`` or
``prefix_matching``.
"""
import json
import sys

import torch
import torch.nn.functional as F


def _model(path):
    import transformers

    model = transformers.GPT2LMHeadModel.from_pretrained(path, attn_implementation="eager")
    return model.double().eval()


def importance(inp):
    """llm-interpret's head importance (and Michel's, for the variant) on the given batches.

    As in ``calculate_importance``: right-padded inputs, attention mask 1 on real tokens, labels
    -100 except on the continuation tokens, the model's own mean LM loss over the labels; the
    context before each ``c_proj`` is hooked, ``|sum_d grad * context|`` summed over examples
    and positions; layers 0..L-2 divided by sum(real length - 1), the last by the label count.
    """
    model = _model(inp["model_dir"])
    cfg = model.config
    heads, d = cfg.n_head, cfg.n_embd // cfg.n_head
    contexts = {}

    def hook(layer):
        def save(module, args):
            args[0].retain_grad()
            contexts[layer] = args[0]
        return save

    for layer, block in enumerate(model.transformer.h):
        block.attn.c_proj.register_forward_pre_hook(hook(layer))
    examples = inp["examples"]
    per_token = torch.zeros(cfg.n_layer, heads, dtype=torch.float64)
    michel = torch.zeros(cfg.n_layer, heads, dtype=torch.float64)
    tot_tokens, eff_tokens, loss_sum = 0, 0, 0.0
    for batch in inp["batches"]:
        rows = [examples[i] for i in batch]
        t = max(len(c) + len(x) for c, x in rows)
        ids = torch.zeros(len(rows), t, dtype=torch.long)
        mask = torch.zeros(len(rows), t, dtype=torch.long)
        labels = torch.full((len(rows), t), -100, dtype=torch.long)
        for r, (c, x) in enumerate(rows):
            seq = torch.tensor(c + x)
            ids[r, :len(seq)] = seq
            mask[r, :len(seq)] = 1
            labels[r, len(c):len(seq)] = torch.tensor(x)
            tot_tokens += len(seq) - 1
            eff_tokens += len(x)
        model.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        n = int((labels != -100).sum())
        loss_sum += loss.item() * n
        for layer in range(cfg.n_layer):
            c, g = contexts[layer], contexts[layer].grad
            b = c.shape[0]
            dot = (c.view(b, t, heads, d) * g.view(b, t, heads, d)).sum(-1)   # [B, T, H]
            per_token[layer] += dot.abs().sum((0, 1)).detach()
            michel[layer] += dot.sum((0, 1)).abs().detach() * n
    llm = per_token.clone()
    llm[:-1] /= tot_tokens
    llm[-1] /= eff_tokens
    michel = michel / eff_tokens
    michel = michel / michel.norm(dim=1, keepdim=True)
    return {"llm-interpret": llm.tolist(), "michel": michel.tolist(),
            "tot_tokens": tot_tokens, "eff_tokens": eff_tokens, "loss": loss_sum / eff_tokens}


def copying(inp):
    """``prefix_matching_copying.py --copying_score`` on GPT-2, for the given token rows.

    Every layer reads LayerNorm(token + position embeddings); the head's attention comes from
    those, its output at position j is c_proj (with bias) of its value at j alone, zero elsewhere;
    lm_head, softmax over the vocabulary; at j = 1..T-1 the ReLU of the attendable tokens'
    probabilities minus their mean, and the share of the most-attended position's token.
    """
    model = _model(inp["model_dir"])
    cfg = model.config
    heads, width = cfg.n_head, cfg.n_embd
    d = width // heads
    tr = model.transformer
    out = []
    with torch.no_grad():
        for row in inp["tokens"]:
            ids = torch.tensor(row)
            t = len(row)
            hidden = tr.wte(ids) + tr.wpe(torch.arange(t))
            scores = torch.zeros(cfg.n_layer, heads, dtype=torch.float64)
            for layer, block in enumerate(tr.h):
                hs = block.ln_1(hidden)
                q, k, v = block.attn.c_attn(hs).split(width, dim=-1)
                q, k, v = (z.view(t, heads, d).transpose(0, 1) for z in (q, k, v))   # [H, T, D]
                w = q @ k.transpose(1, 2) / d ** 0.5
                w = w.masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool)), float("-inf"))
                attn = F.softmax(w, dim=-1)
                for h in range(heads):
                    padded = torch.zeros(t, width, dtype=v.dtype)
                    padded[:, h * d:(h + 1) * d] = v[h]
                    probs = F.softmax(model.lm_head(block.attn.c_proj(padded)), dim=-1)   # [T, V]
                    top = attn[h].argmax(dim=1)
                    total = 0.0
                    for j in range(1, t):
                        p = probs[j][ids[:j + 1]]
                        raised = F.relu(p - p.mean())
                        s = raised.sum().item()
                        total += raised[top[j]].item() / s if s != 0 else 0.0
                    scores[layer, h] = total / (t - 1)
            out.append(scores.tolist())
    return {"copying": out}


def prefix_matching(inp):
    """``prefix_matching_copying.py --prefix_matching`` on GPT-2, for the given token rows.

    Each row is [BOS] + a segment of ``length`` tokens repeated 4 times; the model's own attention
    probabilities (``output_attentions``), and the script's double loop as written.
    """
    model = _model(inp["model_dir"])
    cfg = model.config
    num_layers, num_heads = cfg.n_layer, cfg.n_head
    length = inp["segment_len"]
    final = []
    with torch.no_grad():
        for row in inp["tokens"]:
            new_generated = torch.tensor([row])
            assert new_generated.shape[1] == 4 * length + 1
            attentions = model(input_ids=new_generated, output_attentions=True).attentions
            attn_matrix = torch.zeros((num_layers, num_heads), dtype=torch.float64)
            for layer in range(num_layers):
                attn_probs = attentions[layer][0]
                for head in range(num_heads):
                    attn_prob = attn_probs[head]
                    c = 0
                    for j in range(length + 1, 4 * length + 1):
                        for num in range(j // length):
                            attn_matrix[layer][head] += attn_prob[j][(num * length) + (j % length) + 1].item()
                        c += 1
                    attn_matrix[layer][head] = attn_matrix[layer][head] / c
            final.append(attn_matrix.tolist())
    return {"prefix_matching": final}


if __name__ == "__main__":
    mode, inp_file, out_file = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(inp_file) as f:
        inp = json.load(f)
    result = {"importance": importance, "copying": copying, "prefix_matching": prefix_matching}[mode](inp)
    with open(out_file, "w") as f:
        json.dump(result, f)
