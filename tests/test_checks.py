"""Lab checks: the complete notebooks' solutions pass, wrong or missing answers get a verdict."""

import pytest
from conftest import ROOT, notebook_namespace

from course_utils import checks
from course_utils.checks import FAILED, PASSED, TODO, evaluate
from course_utils.tokenizer import ENDOFTEXT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def notebook_functions(name: str) -> dict:
    return notebook_namespace(ROOT / "notebooks" / name, "### BEGIN SOLUTION")


@pytest.fixture(scope="module")
def lab01():
    return notebook_functions("01_tokenisation.ipynb")


@pytest.mark.parametrize(
    "exercise", [(p.name, e.name) for p in NOTEBOOKS for e in checks.exercises(p.name[:2])], ids=lambda x: x[1]
)
def test_complete_notebooks_pass_every_check(exercise):
    notebook, name = exercise
    verdict = evaluate(name, notebook_functions(notebook)[name])
    assert verdict.status == PASSED, verdict.message
    assert verdict.points == verdict.max_points == 1


def test_every_lab_on_main_has_checks():
    assert NOTEBOOKS and all(checks.exercises(p.name[:2]) for p in NOTEBOOKS)


@pytest.mark.parametrize("exercise", [e.name for e in checks.exercises()])
def test_unimplemented_exercise_is_a_verdict_not_a_crash(exercise):
    def stub(*args):
        raise NotImplementedError(exercise)

    verdict = evaluate(exercise, stub)
    assert verdict.status == TODO and verdict.points == 0 and "not implemented" in verdict.message


def _wrong_merge(ids, pair, new_id):  # merges overlapping pairs
    return [new_id if (a, b) == pair else a for a, b in zip(ids, ids[1:] + [None], strict=False)]


def _least_frequent_training(text, vocab_size):
    ids, merges = list(text.encode()), {}
    from course_utils.tokenizer import merge_pair, pair_counts

    for new_id in range(256, vocab_size):
        counts = pair_counts(ids)
        if not counts:
            break
        pair = min(counts, key=counts.get)
        merges[pair] = new_id
        ids = merge_pair(ids, pair, new_id)
    return merges


def _strict_decode(ids, merges):
    vocab = {i: bytes([i]) for i in range(256)}
    for (a, b), i in merges.items():
        vocab[i] = vocab[a] + vocab[b]
    return b"".join(vocab[i] for i in ids).decode("utf-8")


def _encode_bytes_only(text, merges):
    return list(text.encode())


def _mutating_merge(ids, pair, new_id):
    ids.append(0)
    return []


@pytest.mark.parametrize(
    "exercise, fn, words",
    [
        ("pair_counts", lambda ids: {}, "expected"),
        ("pair_counts", lambda ids: [(a, b) for a, b in zip(ids, ids[1:], strict=False)], "return a dict"),
        ("merge_pair", _wrong_merge, "expected"),
        ("merge_pair", _mutating_merge, "changed the list"),
        ("train_bpe", _least_frequent_training, "most frequent pair"),
        ("train_bpe", lambda text, vocab_size: {}, "while pairs were still left"),
        ("bpe_encode", _encode_bytes_only, "lowest new id first"),
        ("bpe_decode", _strict_decode, "UnicodeDecodeError"),
        ("bpe_decode", lambda ids, merges: 1 / 0, "ZeroDivisionError"),
    ],
)
def test_wrong_answers_get_an_actionable_verdict(exercise, fn, words):  # Lab 01
    verdict = evaluate(exercise, fn)
    assert verdict.status == FAILED and verdict.points == 0
    assert words in verdict.message
    assert verdict.message.startswith("on ")  # names the case


def test_check_prints_verdict_and_running_score(capsys, lab01, monkeypatch):
    monkeypatch.setattr(checks, "SCOREBOARD", {})
    checks.check(lab01["pair_counts"])
    checks.check(lambda ids: {}, name="merge_pair")
    out = capsys.readouterr().out
    assert "✅ pair_counts: passed all" in out
    assert "❌ merge_pair: on " in out
    assert "Lab 01 score so far: 1/5" in out


def test_strict_mode_raises_on_a_failed_check(monkeypatch):
    monkeypatch.setenv("COURSE_STRICT_CHECKS", "1")
    with pytest.raises(checks.StrictCheckError):
        checks.check(lambda ids: {}, name="pair_counts")


def test_misnamed_function_gets_a_message(capsys):
    def my_counts(ids):
        return {}

    checks.check(my_counts)
    assert "no exercise called 'my_counts'" in capsys.readouterr().out


def test_a_reload_of_the_checks_module_keeps_every_exercise():
    import importlib

    before = sorted(checks.EXERCISES)
    fresh = importlib.reload(checks)
    assert sorted(e.name for e in fresh.exercises()) == before
    importlib.reload(checks)


# Labs 02 and 03: plausible mistakes must fail with a message that points at the fix.
import math  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import course_utils.model as gpt  # noqa: E402


def _unscaled_attention(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1) @ v


def _unstable_attention(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    e = torch.exp(scores)
    return e / e.sum(-1, keepdim=True) @ v


def _interleaved_heads(x, w_qkv, w_out, n_head):
    B, T, C = x.shape
    q, k, v = (x @ w_qkv).split(C, -1)
    q, k, v = (t.view(B, T, C // n_head, n_head).permute(0, 3, 1, 2) for t in (q, k, v))  # wrong split
    y = gpt.naive_attention(q, k, v, gpt.causal_mask(T))
    return y.permute(0, 2, 3, 1).reshape(B, T, C) @ w_out


def _grouped(x, w_qkv, w_out, n_head, n_kv_head, tile=False, equal_split=False):
    B, T, C = x.shape
    hs = C // n_head
    q, k, v = (x @ w_qkv).split(C if equal_split else [C, n_kv_head * hs, n_kv_head * hs], -1)
    q = q.view(B, T, n_head, hs).transpose(1, 2)
    k, v = (t.view(B, T, n_kv_head, hs).transpose(1, 2) for t in (k, v))
    g = n_head // n_kv_head
    k, v = (t.repeat(1, g, 1, 1) if tile else t.repeat_interleave(g, 1) for t in (k, v))
    return gpt.naive_attention(q, k, v, gpt.causal_mask(T)).transpose(1, 2).reshape(B, T, C) @ w_out


def _rotate(x, positions, base, adjacent=False, exponent=2, sign=1):
    hs = x.size(-1)
    theta = base ** (-torch.arange(hs // 2).float() * exponent / hs)
    angle = positions.float()[:, None] * theta
    if adjacent:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x[..., : hs // 2], x[..., hs // 2 :]
    c, s = angle.cos(), sign * angle.sin()
    y1, y2 = x1 * c - x2 * s, x1 * s + x2 * c
    return torch.stack([y1, y2], -1).flatten(-2) if adjacent else torch.cat([y1, y2], -1)


def _unbiased_layer_norm(x, w, b, eps=1e-5):
    return w * (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + eps) + b


def _uncached_generation(model, idx, n):
    for _ in range(n):
        logits, _ = model(idx)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return idx


def _top_p_one_short(logits, p):
    sorted_logits, order = torch.sort(logits, -1, descending=True)
    probs = torch.softmax(sorted_logits, -1)
    drop = probs.cumsum(-1) > p  # drops the token that reaches p
    drop[..., 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


@pytest.mark.parametrize(
    "exercise, fn, words",
    [
        ("attention", _unscaled_attention, "sqrt(d)"),
        ("attention", _unstable_attention, "inf or nan"),
        ("causal_mask", lambda t: torch.ones(t, t).tril(), "torch.bool"),
        ("causal_mask", lambda t: torch.ones(t, t, dtype=torch.bool).triu(), "below the diagonal"),
        ("multi_head_attention", _interleaved_heads, "consecutive columns"),
        ("grouped_query_attention", lambda *a: _grouped(*a, tile=True), "repeat_interleave, not repeat"),
        ("rotate", lambda *a: _rotate(*a, adjacent=True), "Pair dimension i with i + hs/2"),
        ("rotate", lambda *a: _rotate(*a, exponent=1), "base^(-2i/hs)"),
        ("rotate", lambda *a: _rotate(*a, sign=-1), "x_i sin + x_(i+hs/2) cos"),
        ("grouped_query_attention", lambda *a: _grouped(*a, equal_split=True), "n_kv_head * hs each"),
        ("layer_norm", _unbiased_layer_norm, "biased variance"),
        ("gelu_tanh", lambda x: x * 0.5 * (1 + torch.erf(x / math.sqrt(2))), "tanh"),
        ("greedy_next", lambda logits: logits.max(-1).values, "position of the largest"),
        ("temperature_probs", lambda logits, t: torch.softmax(logits * t, -1), "divide the logits"),
        ("top_k_filter", lambda logits, k: logits, "k largest"),
        ("top_p_filter", _top_p_one_short, "reaches p"),
        ("generate_cached", _uncached_generation, "KVCache"),
    ],
)
def test_lab02_lab03_mistakes_get_an_actionable_verdict(exercise, fn, words):
    verdict = evaluate(exercise, fn)
    assert verdict.status == FAILED and words in verdict.message, verdict.message


def _step_without_dividing(model, optimizer, batches, grad_clip):
    total = 0.0
    for x, y in batches:
        _, loss = model(x, y)
        loss.backward()  # sums the micro-batch gradients instead of averaging them
        total += loss.item() / len(batches)
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad()
    return total


def _step_without_clipping(model, optimizer, batches, grad_clip):
    total = 0.0
    for x, y in batches:
        _, loss = model(x, y)
        (loss / len(batches)).backward()
        total += loss.item() / len(batches)
    optimizer.step()
    optimizer.zero_grad()
    return total


def _step_keeping_gradients(model, optimizer, batches, grad_clip):
    total = 0.0
    for x, y in batches:
        _, loss = model(x, y)
        (loss / len(batches)).backward()
        total += loss.item() / len(batches)
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return total


def _loss_without_the_maximum(logits, ids):
    z, targets = logits[:-1], ids[1:]
    return (z.exp().sum(-1).log() - z.gather(1, targets[:, None])[:, 0]).mean()


@pytest.mark.parametrize(
    "exercise, fn, words",
    [
        (
            "warmup_cosine_lr",
            lambda s, lr, w, m, lo: lo + 0.5 * (lr - lo) * (1 + math.cos(math.pi * min(s, m) / m)),
            "Warm-up",
        ),
        ("warmup_cosine_lr", lambda s, lr, w, m, lo: lr * (s + 1) / w if s < w else lr, "cos(pi*progress)"),
        ("optimisation_step", _step_without_dividing, "Divide each micro-batch loss"),
        ("optimisation_step", _step_without_clipping, "clip"),
        ("optimisation_step", _step_keeping_gradients, "zero_grad"),
        ("model_flops_utilisation", lambda n, nl, ne, t, tps, peak: 6 * n * tps / peak, "12 n_layer n_embd T"),
        ("next_token_loss", lambda z, ids: F.cross_entropy(z, ids), "pair logits[:-1] with ids[1:]"),
        ("next_token_loss", lambda z, ids: F.cross_entropy(z[:-1], ids[1:], reduction="sum"), "average them"),
        ("next_token_loss", _loss_without_the_maximum, "Subtract each row's maximum"),
        ("next_token_loss", lambda z, ids: F.cross_entropy(z[:-1], ids[1:]).tolist(), "as a tensor"),
    ],
)
def test_lab04_mistakes_get_an_actionable_verdict(exercise, fn, words):
    verdict = evaluate(exercise, fn)
    assert verdict.status == FAILED and words in verdict.message, verdict.message


def _render_training_everything(conversation, tokenizer):
    from course_utils import sft

    ids, _ = sft.render_conversation(conversation, tokenizer)
    return ids, [True] * len(ids)


def _render_with_specials_in_text(conversation, tokenizer):
    from course_utils import sft

    special = tokenizer.special_tokens
    ids, trained = [special[ENDOFTEXT]], [False]
    for turn in conversation:
        content = tokenizer.encode(turn["content"], allowed_special="all")
        if turn["role"] == "user":
            piece = [special[sft.USER], *content, special[sft.END], special[sft.ASSISTANT]]
            ids, trained = ids + piece, trained + [False] * len(piece)
        else:
            ids, trained = ids + [*content, special[sft.END]], trained + [True] * (len(content) + 1)
    return ids, trained


def _loss_over_everything(logits, targets):
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.clamp(min=0).reshape(-1))


def _loss_summed(logits, targets):
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )


@pytest.mark.parametrize(
    "exercise, fn, words",
    [
        ("render_conversation", _render_training_everything, "Only the assistant's text"),
        ("render_conversation", _render_with_specials_in_text, "encode_ordinary"),
        ("shift_labels", lambda ids, trained: (ids[:-1], ids[1:]), "IGNORE (-100)"),
        (
            "shift_labels",
            lambda ids, trained: (ids[:-1], [t if k else -100 for t, k in zip(ids[1:], trained[:-1], strict=True)]),
            "when that token is trained on",
        ),
        ("masked_loss", _loss_over_everything, "kept positions only"),
        ("masked_loss", _loss_summed, "mean over kept positions"),
    ],
)
def test_lab06_mistakes_get_an_actionable_verdict(exercise, fn, words):
    verdict = evaluate(exercise, fn)
    assert verdict.status == FAILED and words in verdict.message, verdict.message


def _reward_substring(response, answer):
    return 1.1 if answer.lower() in response.lower() else 0.0


def _reward_without_format(response, answer):
    from course_utils.rl import extract_answer
    from course_utils.world import normalise_answer

    final = extract_answer(response)
    return float(final is not None and normalise_answer(final) == normalise_answer(answer))


def _advantages_unscaled(rewards):
    return rewards - rewards.mean(1, keepdim=True)


def _advantages_no_eps(rewards):
    return (rewards - rewards.mean(1, keepdim=True)) / rewards.std(1, keepdim=True, correction=0)


def _advantages_whole_batch(rewards):
    return (rewards - rewards.mean()) / (rewards.std(correction=0) + 1e-4)


def _grpo_loss_variant(*, token_level=False, beta_sign=1.0, clip_on=True):
    def loss(logp, old_logp, ref_logp, advantages, mask, clip, beta):
        ratio = torch.exp(logp - old_logp)
        adv = advantages[:, None]
        clipped = ratio.clamp(1 - clip, 1 + clip) if clip_on else ratio
        d = ref_logp - logp
        per_token = -(torch.minimum(ratio * adv, clipped * adv) - beta_sign * beta * (torch.exp(d) - d - 1)) * mask
        if token_level:
            return per_token.sum() / mask.sum()
        return (per_token.sum(1) / mask.sum(1)).mean()

    return loss


def _bt_flipped(chosen, rejected):
    return -torch.nn.functional.logsigmoid(rejected - chosen).mean()


def _bt_naive_log(chosen, rejected):
    return -torch.log(torch.sigmoid(chosen - rejected)).mean()


def _bt_summed(chosen, rejected):
    return -torch.nn.functional.logsigmoid(chosen - rejected).sum()


def _dpo_no_reference(pc, pr, rc, rr, beta=0.1):
    return -torch.nn.functional.logsigmoid(beta * (pc - pr)).mean()


def _dpo_beta_outside(pc, pr, rc, rr, beta=0.1):
    return -beta * torch.nn.functional.logsigmoid((pc - rc) - (pr - rr)).mean()


def _dpo_flipped(pc, pr, rc, rr, beta=0.1):
    return -torch.nn.functional.logsigmoid(beta * ((pr - rr) - (pc - rc))).mean()


@pytest.mark.parametrize(
    "exercise, fn, words",
    [
        ("bradley_terry_loss", _bt_flipped, "wrong sign"),
        ("bradley_terry_loss", _bt_naive_log, "F.logsigmoid"),
        ("bradley_terry_loss", _bt_summed, "take the mean"),
        ("dpo_loss", _dpo_no_reference, "reference model is missing"),
        ("dpo_loss", _dpo_beta_outside, "inside the sigmoid"),
        ("dpo_loss", _dpo_flipped, "wrong sign"),
        ("reasoning_reward", _reward_substring, "does not end that way earns 0"),
        ("reasoning_reward", _reward_without_format, "plus 0.1 for that format"),
        ("group_advantages", _advantages_unscaled, "not divided by the group's standard deviation"),
        ("group_advantages", _advantages_no_eps, "add eps"),
        ("group_advantages", _advantages_whole_batch, "each group's (row's) mean"),
        ("grpo_loss", _grpo_loss_variant(token_level=True), "average over each reply's tokens"),
        ("grpo_loss", _grpo_loss_variant(beta_sign=0.0), "KL penalty is missing"),
        ("grpo_loss", _grpo_loss_variant(beta_sign=-1.0), "wrong sign"),
        ("grpo_loss", _grpo_loss_variant(clip_on=False), "never clipped"),
    ],
)
def test_lab09_mistakes_get_an_actionable_verdict(exercise, fn, words):
    verdict = evaluate(exercise, fn)
    assert verdict.status == FAILED and words in verdict.message, verdict.message


@pytest.mark.parametrize(
    "exercise, fn",
    [
        ("group_advantages", lambda r: __import__("course_utils.rl").rl.group_advantages(r)),
        ("grpo_loss", _grpo_loss_variant()),
        ("reasoning_reward", lambda r, a: __import__("course_utils.rl").rl.reasoning_reward(r, a)),
        ("bradley_terry_loss", lambda c, r: __import__("course_utils.preference").preference.bradley_terry_loss(c, r)),
        ("dpo_loss", lambda *a: __import__("course_utils.preference").preference.dpo_loss(*a)),
    ],
)
def test_lab09_right_answers_pass(exercise, fn):
    verdict = evaluate(exercise, fn)
    assert verdict.status == PASSED, verdict.message


def _bm25_no_length_norm(query, documents, k1=1.5, b=0.75):
    from course_utils.retrieval import BM25

    return BM25([" ".join(d) for d in documents], k1=k1, b=0.0).scores(" ".join(query))


def _bm25_plain_idf(query, documents, k1=1.5, b=0.75):
    import math
    from collections import Counter

    n, avg = len(documents), sum(len(d) for d in documents) / len(documents)
    df = Counter(t for d in documents for t in set(d))
    out = []
    for d in documents:
        c = Counter(d)
        out.append(
            sum(math.log(n / df[t]) * c[t] * (k1 + 1) / (c[t] + k1 * (1 - b + b * len(d) / avg)) for t in query if c[t])
        )
    return out


@pytest.mark.parametrize(
    "exercise, fn, words",
    [
        ("bm25_scores", _bm25_no_length_norm, "IDF is log(1 + (N - df + 0.5) / (df + 0.5))"),
        ("bm25_scores", _bm25_plain_idf, "IDF is log(1 + (N - df + 0.5) / (df + 0.5))"),
        ("top_k", lambda scores, k: sorted(range(len(scores)), key=lambda i: scores[i])[:k], "highest first"),
        (
            "top_k",
            lambda scores, k: sorted(range(len(scores)), key=lambda i: -scores[i] + 1e-9 * -i)[:k],
            "ties by the lower index",
        ),
        (
            "recall_at_k",
            lambda rankings, relevant, k: (
                sum(r[k - 1] in rel for r, rel in zip(rankings, relevant, strict=True)) / len(rankings)
            ),
            "among its first k",
        ),
        (
            "rag_prompt",
            lambda q, docs: " ".join(["Read this text and answer the question.", *docs, f"Question: {q}"]),
            "joined by newlines",
        ),
    ],
)
def test_lab08_mistakes_get_an_actionable_verdict(exercise, fn, words):
    verdict = evaluate(exercise, fn)
    assert verdict.status == FAILED and words in verdict.message, verdict.message
