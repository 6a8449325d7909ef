import math
import re

import pytest
import torch

from course_utils import rl, sft, world
from course_utils.model import GPT, GPTConfig
from course_utils.rl import RLError

# -- the verifiable reward ----------------------------------------------------------------------


def test_reward_checks_the_final_answer_and_the_format():
    assert rl.reasoning_reward("Ann was born in 1950. 1990 - 1950 = 40. The answer is 40.", "40") == pytest.approx(1.1)
    assert rl.reasoning_reward("The answer is Tara Voss", "tara voss.") == pytest.approx(1.1)  # case, punctuation
    assert rl.reasoning_reward("1990 - 1950 = 41. The answer is 41.", "40") == pytest.approx(0.1)  # well formed, wrong
    assert rl.reasoning_reward("The answer is 40. Then she went to the park.", "40") == 0.0  # must end with the answer
    assert rl.reasoning_reward("It is 40.", "40") == 0.0
    assert rl.reasoning_reward("The answer is 400.", "40") == pytest.approx(0.1)
    assert rl.reasoning_reward("The answer is 40.", "40", format_bonus=0.0) == 1.0
    assert rl.extract_answer("so Tara is older. The answer is Tara Voss.") == "Tara Voss"
    assert rl.extract_answer("The answer is") is None


def test_problem_prompts_match_the_worked_answers_the_sft_model_saw():
    w = world.make_world(0)
    problem = w.reasoning_problems("sft", 5, seed=0)[0]
    item = sft.reasoning_items(w, "sft", 5, seed=0)[0]
    assert rl.problem_conversation(problem) == item.conversation[:1]
    assert rl.reasoning_reward(item.conversation[1]["content"], problem["answer"]) == pytest.approx(1.1)


def test_checked_reward_refuses_a_right_answer_reached_through_a_wrong_step():
    w = world.make_world(0)
    problems = w.reasoning_problems("heldout", 30, seed=0)
    for problem in problems:  # every worked answer the SFT model is taught passes its own check
        assert rl.checked_reward(sft.worked_answer(problem, w), problem) == pytest.approx(1.1)
    older = next(p for p in problems if p["kind"] == "older")
    a, b = (w.person(n) for n in older["names"])  # a is the elder
    end = f", so {a.name} is older. The answer is {a.name}."
    right = f"{a.name} was born in {a.birth_year} and {b.name} in {b.birth_year}" + end
    miscopied = right.replace(str(b.birth_year), str(b.birth_year + 1), 1)
    swapped = f"{a.name} was born in {b.birth_year} and {b.name} in {a.birth_year}" + end
    wrong_name = f"{a.name} was born in {a.birth_year} and Zed Quorn in {b.birth_year}. The answer is {a.name}."
    wrong_step = right.replace(f"so {a.name} is older", f"so {b.name} is older")  # right years, wrong comparison
    assert rl.answer_reward(miscopied, older) == pytest.approx(1.1)  # the outcome alone cannot tell
    assert rl.checked_reward(right, older) == pytest.approx(1.1)
    for reply in (miscopied, swapped, wrong_name, wrong_step):
        assert rl.checked_reward(reply, older) == pytest.approx(0.1), reply
    age = next(p for p in problems if p["kind"] == "age")
    (person,) = (w.person(n) for n in age["names"])
    year = int(age["answer"]) + person.birth_year
    good = f"{person.name} was born in {person.birth_year}. {year} - {person.birth_year} = {age['answer']}."
    good += f" The answer is {age['answer']}."
    false_sum = good.replace(f"= {age['answer']}.", f"= {int(age['answer']) + 1}.")
    made_up = good.replace(f"{year} - {person.birth_year}", f"{year + 1} - {person.birth_year + 1}")
    assert rl.checked_reward(good, age) == pytest.approx(1.1)
    assert rl.checked_reward(false_sum, age) == pytest.approx(0.1)  # the step is false, the answer right
    assert rl.checked_reward(made_up, age) == pytest.approx(0.1)  # true arithmetic on numbers not in the prompt
    assert rl.checked_reward("The answer is 7.", age) == pytest.approx(0.1)  # wrong, well formed
    assert rl.checked_reward(f"The answer is {age['answer']}.", age) == pytest.approx(0.1)  # right, but no steps
    assert rl.checked_reward(f"The answer is {a.name}.", older) == pytest.approx(0.1)
    one_year = f"{a.name} was born in {a.birth_year}, so {a.name} is older. The answer is {a.name}."
    assert rl.checked_reward(one_year, older) == pytest.approx(0.1)  # the other person's year is missing
    day = int(age["question"].split(", ")[0].rsplit(" ", 1)[1])  # the day of the birth date: a number, not a year
    assert not rl.steps_hold(f"{day + 1} - 1 = {day}.", rl.problem_conversation(age)[0]["content"])
    assert not rl.steps_hold(f"{year}-{person.birth_year}={int(age['answer']) + 2}.", age["question"])  # no spaces
    assert rl.steps_hold("No steps at all.", "Ann Lee was born on May 1, 1950.")


def test_rollout_scores_each_reply_against_its_own_problem(chat_tok):
    model = tiny_model(chat_tok.n_vocab)
    problems = [PROBLEMS[1], PROBLEMS[0]]
    roll = rl.rollout(model, chat_tok, problems, group_size=3, max_new_tokens=2,
                      reward_fn=lambda text, problem: float(PROBLEMS.index(problem)))  # fmt: skip
    assert roll.rewards.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


# -- the toy problem ---------------------------------------------------------------------------

PRIOR = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
REWARDS = torch.tensor([0.0, 0.2, 1.0, 0.5, 1.0])


def test_closed_form_optimum_beats_every_nearby_policy():
    beta = 0.3
    best = rl.kl_optimal_policy(PRIOR, REWARDS, beta)
    assert best.sum().item() == pytest.approx(1.0)
    value = rl.regularised_objective(best, PRIOR, REWARDS, beta)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        other = torch.softmax(best.log() + 0.3 * torch.randn(5, generator=gen, dtype=torch.float64), 0)
        assert rl.regularised_objective(other, PRIOR, REWARDS, beta) < value
    # large beta keeps the prior; small beta puts (nearly) all mass on the best rewards
    assert rl.total_variation(rl.kl_optimal_policy(PRIOR, REWARDS, 1e3), PRIOR) < 1e-3
    assert rl.kl_optimal_policy(PRIOR, REWARDS, 0.01)[[2, 4]].sum().item() > 0.999
    with pytest.raises(RLError, match="beta"):
        rl.kl_optimal_policy(PRIOR, REWARDS, 0.0)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_policy_gradient_converges_to_the_closed_form_optimum(beta):
    policy, distance = rl.toy_policy_gradient(PRIOR, REWARDS, beta, steps=2000, seed=0)
    target = rl.kl_optimal_policy(PRIOR, REWARDS, beta)
    assert distance[0] > 0.1  # the prior is far from the optimum ...
    assert rl.total_variation(policy, target) < 0.02  # ... and the learned policy lands on it
    assert distance[-1] == pytest.approx(rl.total_variation(policy, target))


# -- advantages and the loss ---------------------------------------------------------------------


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.1, 0.1, 0.1, 0.1], [1.1, 0.1, 0.1, 0.1]])
    adv = rl.group_advantages(rewards, eps=0.0 + 1e-12)
    # group 0: mean 0.5, population std 0.5
    assert adv[0].tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0])
    # group 1: every answer earned the same: nothing to learn
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    # group 2: mean 0.35, std sqrt(0.1875)
    std = math.sqrt(0.1875)
    assert adv[2].tolist() == pytest.approx([0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std])
    centred = rl.group_advantages(rewards, scale=False)
    assert centred[2].tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])
    assert rl.group_advantages(rewards)[1].abs().max().item() == 0.0  # eps keeps it finite
    with pytest.raises(RLError, match="prompts, group"):
        rl.group_advantages(torch.ones(4))


def test_grpo_loss_by_hand():
    # two replies, three token slots; the second reply has two tokens
    mask = torch.tensor([[True, True, True], [True, True, False]])
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.9]]))
    adv = torch.tensor([2.0, -1.0])
    # on-policy, at the reference: the loss is minus the mean advantage
    loss, stats = rl.grpo_loss(logp, logp, logp, adv, mask, beta=0.5)
    assert loss.item() == pytest.approx(-(2.0 - 1.0) / 2)
    assert stats["kl"] == pytest.approx(0.0, abs=1e-7) and stats["clip_fraction"] == 0.0
    # token-level averaging weighs the three-token reply more: -(2*3 - 1*2) / 5
    loss, _ = rl.grpo_loss(logp, logp, logp, adv, mask, token_level=True)
    assert loss.item() == pytest.approx(-4 / 5)
    # ratios outside the clip range: reply 0 (A > 0) has ratio 1.5 -> 1.2; reply 1 (A < 0) has ratio
    # 0.5 -> 0.8 (the pessimistic, clipped term); the KL to a reference twice as likely is
    # 2 - log 2 - 1 on every token
    old = logp - torch.log(torch.tensor([[1.5, 1.5, 1.5], [0.5, 0.5, 0.5]]))
    ref = logp + math.log(2.0)
    loss, stats = rl.grpo_loss(logp, old, ref, adv, mask, clip=0.2, beta=0.1)
    k3 = 2 - math.log(2) - 1
    assert loss.item() == pytest.approx(-((1.2 * 2.0 - 0.1 * k3) + (0.8 * -1.0 - 0.1 * k3)) / 2, rel=1e-5)
    assert stats["kl"] == pytest.approx(k3, rel=1e-5) and stats["clip_fraction"] == 1.0
    # padding never counts: changing a masked-out slot changes nothing
    logp2 = logp.clone()
    logp2[1, 2] = -20.0
    assert rl.grpo_loss(logp2, old, ref, adv, mask)[0].item() == pytest.approx(
        rl.grpo_loss(logp, old, ref, adv, mask)[0].item()
    )
    with pytest.raises(RLError, match="one per reply"):
        rl.grpo_loss(logp, logp, logp, torch.ones(3), mask)


def test_grpo_gradient_pushes_good_replies_up_and_bad_ones_down():
    logp = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]])).requires_grad_(True)
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss, _ = rl.grpo_loss(logp, logp.detach(), logp.detach(), torch.tensor([1.0, -1.0]), mask, beta=0.0)
    loss.backward()
    # d(loss)/d(logp) = -A / (tokens in the reply) / (replies)
    assert logp.grad.flatten().tolist() == pytest.approx([-0.25, -0.25, 0.25, 0.25])


def test_pass_at_k():
    assert rl.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert rl.pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)
    assert rl.pass_at_k(10, 0, 5) == 0.0
    assert rl.pass_at_k(5, 3, 3) == 1.0  # only two wrong answers: any three include a right one
    with pytest.raises(RLError):
        rl.pass_at_k(4, 5, 1)


# -- sampling and training on a tiny model --------------------------------------------------------


def tiny_model(vocab: int) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab, context_length=96, n_layer=1, n_head=2, n_embd=32))


PROBLEMS = [
    {
        "question": "Who is older, Ann Bell or Tom Dale?",
        "facts": ["Ann Bell was born on May 1, 1950."],
        "answer": "Ann Bell",
    },
    {"question": "How old was Tom Dale in 1990?", "facts": ["Tom Dale was born on June 2, 1961."], "answer": "29"},
]


def test_rollouts_mark_exactly_the_reply_tokens(chat_tok):
    model = tiny_model(chat_tok.n_vocab)
    gen = torch.Generator().manual_seed(0)
    samples = [
        (r.prompt, r.reply, r.text)
        for r in sft.sample_replies(
            model,
            chat_tok,
            [rl.problem_conversation(p) for p in PROBLEMS],
            n=3,
            max_new_tokens=8,
            temperature=1.0,
            generator=gen,
        )
    ]
    assert len(samples) == 6 and samples[0][0] == samples[2][0] != samples[3][0]
    gen = torch.Generator().manual_seed(0)
    roll = rl.rollout(model, chat_tok, PROBLEMS, group_size=3, max_new_tokens=8, generator=gen)
    for i, (prompt, reply, text) in enumerate(samples):
        assert roll.ids[i, 1:][roll.mask[i]].tolist() == reply  # the mask picks out the reply, nothing else
        assert roll.ids[i, : len(prompt)].tolist() == prompt
        assert roll.texts[i] == text
    assert roll.lengths.tolist() == [len(r) for _, r, _ in samples]
    # the log-probabilities of the batch equal those of each row alone (padding changes nothing)
    full = rl.token_logprobs(model, roll.ids)
    for i, (prompt, reply, _) in enumerate(samples):
        alone = rl.token_logprobs(model, torch.tensor([prompt + reply]))
        assert torch.allclose(full[i, : len(prompt) + len(reply) - 1], alone[0], atol=1e-5)


def test_grpo_raises_reward_and_leaves_the_reference_untouched(chat_tok):
    model = tiny_model(chat_tok.n_vocab)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # a reward the tiny model can learn quickly: the more of its reply is the letter "e", the better

    def likes_e(text, problem):
        return text.count("e") / max(1, len(text))

    cfg = rl.GRPOConfig(
        steps=30, prompts_per_step=2, group_size=8, lr=3e-2, beta=0.0, max_new_tokens=6, eval_every=0, seed=0
    )
    trained, history = rl.grpo(model, chat_tok, PROBLEMS, PROBLEMS, cfg, progress=False, reward_fn=likes_e)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the reference is frozen
    assert history[0]["step"] == 0 and "accuracy" in history[0] and "accuracy" in history[-1]
    first = sum(h["reward"] for h in history[1:6]) / 5
    last = sum(h["reward"] for h in history[-5:]) / 5
    assert last > first + 0.15  # measured: about 0.09 -> 0.32
    assert history[-1]["kl"] > 0  # it moved away from the reference


def test_equal_rewards_and_no_kl_leave_the_policy_unchanged(chat_tok):
    model = tiny_model(chat_tok.n_vocab)
    cfg = rl.GRPOConfig(steps=2, prompts_per_step=2, group_size=4, lr=1e-2, beta=0.0, max_new_tokens=4, eval_every=0)
    trained, history = rl.grpo(
        model, chat_tok, PROBLEMS, PROBLEMS, cfg, progress=False, reward_fn=lambda text, problem: 1.0
    )
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values(), strict=True)
    )
    assert all(h["reward"] == 1.0 for h in history[1:])
    with pytest.raises(RLError, match="group_size"):
        rl.grpo(model, chat_tok, PROBLEMS, PROBLEMS, rl.GRPOConfig(group_size=1), progress=False)


def test_shipped_gsm8k_problems_have_numeric_answers():
    problems = rl.gsm8k()
    assert len(problems) == 1319
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", p["answer"]) for p in problems)
    assert problems[0]["answer"] == "18" and "####" not in problems[0]["solution"]


def test_grpo_resumes_exactly_and_refuses_other_settings(chat_tok, tmp_path):
    cfg = rl.GRPOConfig(steps=4, prompts_per_step=1, group_size=3, lr=1e-2, max_new_tokens=5, eval_every=2)
    likes_e = lambda text, answer: text.count("e") / max(1, len(text))  # noqa: E731
    straight, history = rl.grpo(
        tiny_model(chat_tok.n_vocab), chat_tok, PROBLEMS, PROBLEMS, cfg, progress=False, reward_fn=likes_e
    )
    first_half = rl.GRPOConfig(**{**vars(cfg), "steps": 2})
    rl.grpo(
        tiny_model(chat_tok.n_vocab),
        chat_tok,
        PROBLEMS,
        PROBLEMS,
        first_half,
        out_dir=tmp_path,
        progress=False,
        reward_fn=likes_e,
    )
    torch.manual_seed(123)  # a session that starts afresh has other random states; the checkpoint restores them
    resumed, history2 = rl.grpo(
        tiny_model(chat_tok.n_vocab),
        chat_tok,
        PROBLEMS,
        PROBLEMS,
        cfg,
        out_dir=tmp_path,
        progress=False,
        reward_fn=likes_e,
    )
    assert history2 == history
    assert all(
        torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True)
    )
    with pytest.raises(RLError, match="other settings"):
        rl.grpo(
            tiny_model(chat_tok.n_vocab),
            chat_tok,
            PROBLEMS,
            PROBLEMS,
            rl.GRPOConfig(**{**vars(cfg), "lr": 1e-3}),
            out_dir=tmp_path,
            progress=False,
        )
    (tmp_path / "grpo.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RLError, match="damaged"):
        rl.grpo(tiny_model(chat_tok.n_vocab), chat_tok, PROBLEMS, PROBLEMS, cfg, out_dir=tmp_path, progress=False)


def test_command_line_run_writes_its_summary(tmp_path):
    import json

    from course_utils.recipes import grpo as recipe

    assert (
        recipe.main(
            [
                "--out-dir",
                str(tmp_path),
                "--steps",
                "1",
                "--prompts-per-step",
                "1",
                "--group-size",
                "2",
                "--n-eval",
                "3",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["steps"] == 1 and 0 <= summary["accuracy_after"] <= 1
    assert set(summary["pass_at_k_before"]) == {"1", "4", "16"}
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["step"] for h in history] == [0, 1] and (tmp_path / "grpo.pt").exists()
