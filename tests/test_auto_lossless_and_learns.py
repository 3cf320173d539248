"""--tree auto: lossless while it switches configurations, and it learns when drafting pays."""

import random

import pytest
import torch

import minitree
from minitree.auto import HORIZON, NGRAM_ONLY, Auto, Config
from reference import T1, chi_square_pvalue, plain, prompt, sample_transitions, transition_matrix
from tiny import save_random

PROMPT = prompt(100, 3)
HISTORY = prompt(60, 5)  # committed tokens, for the n-gram lookups at each step's root


def cycling(monkeypatch, seed=0):
    """Make Auto.choose pick configurations at random (plain included): every switch, catch-up
    after plain steps and new shape is exercised."""
    rng = random.Random(seed)
    monkeypatch.setattr(Auto, "choose", lambda self, *args: self.configs[0] if rng.random() < 0.4 else rng.choice(self.configs))


def test_greedy_exact_while_switching(pair, monkeypatch):
    target, draft = pair
    cycling(monkeypatch)
    result = minitree.Engine(target, draft, "auto", compile=False, max_seq_len=512).generate(PROMPT, 90)
    assert result.tokens == plain(target, PROMPT, 90)
    assert len(result.stats.configs) >= 8 and result.stats.configs["plain"] >= 10
    assert sum(result.stats.accepted_ranks.values()) > 0


def test_auto_draft_chooses_without_ngram_branches(pair, monkeypatch):
    """"auto:draft": the same choice among plain decoding and the draft's trees only (the comparison
    bench draws against "auto"); it needs a draft."""
    target, draft = pair
    cycling(monkeypatch, seed=2)
    result = minitree.Engine(target, draft, "auto:draft", compile=False, max_seq_len=512).generate(PROMPT, 40)
    assert result.tokens == plain(target, PROMPT, 40)
    assert len(result.stats.configs) >= 4 and not any("ngram" in name for name in result.stats.configs)
    with pytest.raises(minitree.EngineError, match="auto:draft .* needs a draft"):
        minitree.Engine(target, None, "auto:draft", compile=False)


def test_sampling_matches_target_while_switching(markov_pair, monkeypatch):
    cycling(monkeypatch, seed=1)
    counts, tau = sample_transitions(*markov_pair, "auto", T1)
    pvalue = chi_square_pvalue(counts, transition_matrix(markov_pair[0], T1))
    print(f"auto, configurations at random: tau {tau:.3f}, p-value {pvalue:.3g}")
    assert tau > 1.1 and pvalue > 1e-3


def cheap_draft_costs(monkeypatch):
    """Engines made next price steps with costs shaped like the CPU's: a draft forward a fifth of a
    target forward (unmeasured: step timings do not outweigh them)."""
    def auto(draft_cost, verify_cost, seconds, configs):
        a = Auto(lambda rows: 0.2 + 0.01 * rows, lambda rows: 1.0 + 0.02 * rows, seconds=False, configs=configs)
        a.draft_extra = a.extra_prior = 0.0
        return a

    monkeypatch.setattr(minitree.engine, "Auto", auto)


def test_learns_to_stop_drafting_with_a_useless_draft(pair, tmp_path, monkeypatch):
    target, _ = pair
    cheap_draft_costs(monkeypatch)
    save_random(tmp_path / "unrelated", "qwen2", seed=99, tie_word_embeddings=False)
    engine = minitree.Engine(target, minitree.load(tmp_path / "unrelated"), "auto", compile=False, max_seq_len=512)
    configs = engine.generate(PROMPT, 120).stats.configs
    print(dict(configs))  # without the draft: plain decoding, or n-gram branches where the text repeats
    assert sum(n for name, n in configs.items() if "dynamic" not in name) >= 0.75 * sum(configs.values())


def test_keeps_drafting_with_a_good_draft(pair, pair_dirs, monkeypatch):
    target, _ = pair
    cheap_draft_costs(monkeypatch)
    copy = minitree.load(pair_dirs[0])  # the draft always agrees (its own instance: its own cache)
    engine = minitree.Engine(target, copy, "auto", compile=False, max_seq_len=512)
    stats = engine.generate(PROMPT, 120).stats
    print(dict(stats.configs))
    assert stats.configs["plain"] == 0 and stats.tau > 2.5


def step(verified, path, candidates, levels, times):
    """What Auto.observe reads of an engine step (stats.Step)."""
    tree = minitree.StepTree(*[None] * 10)._replace(tokens=torch.zeros(len(verified)), conf=torch.tensor(verified),
                                                    candidates=torch.tensor(candidates))
    return minitree.Step(None, None, torch.tensor(path), tree, levels, times)


def test_calibration_and_prediction():
    """A draft whose confidence overstates acceptance is learned as such; a configuration's model
    counts its nodes at their calibrated acceptance, and what it did outweighs that once it ran."""
    a = Auto(lambda rows: 0.05, lambda rows: 0.2)
    assert a.acceptance(0.9) == pytest.approx(0.925)  # the prior: calibrated
    candidates = [1.0, 0.92, 0.05, -1.0, -1.0] + [0.92, 0.92] + [-1.0] * 6  # depth 2, width 2: 4 + 8 candidates
    for _ in range(200):  # nodes of confidence ~0.92 (fp32 on the device) are accepted a third of the time
        a.observe(Config(2, 3), step([1.0, 0.92, 0.92, 0.92], [0, 1, 1], candidates, 2, dict(draft=0.1, verify=0.2)), 2, HISTORY)
    assert a.acceptance(0.92) == pytest.approx(1 / 3, abs=0.02)
    assert a.verify_extra[4] == pytest.approx(0.0, abs=1e-3)  # 4-row verifies took their probed 0.2 s
    # one row, not timed yet: the nearest timed row count's overhead share (4 rows: none), not the prior's 30%
    assert a.predicted(Config(0, 0)) == pytest.approx(1 / 0.2)
    assert Auto(lambda rows: 0.05, lambda rows: 0.2).predicted(Config(0, 0)) == pytest.approx(1 / (0.2 + 0.3 * 0.2))
    # a configuration that ran is predicted from what it did: 2 tokens per 0.3 s step
    assert a.predicted(Config(2, 3)) == pytest.approx(2 / 0.3, rel=0.02)
    assert a.modelled(Config(2, 3))[0] == pytest.approx(1 + 3 * (1 / 3), rel=0.05)


def _modelled_best(second_p: float, draft_cost) -> int:
    """The width of the configuration modelled fastest after steps whose draft (width 2, depth 4)
    gave each node children of probabilities [p0, second_p, ...] (a calibrated draft)."""
    a = Auto(draft_cost, lambda rows: 1.0)
    a.draft_extra = a.extra_prior = 0.0
    probs = [0.97 - second_p, second_p, 0.02, 0.01]
    candidates, level = [1.0], [1.0]
    for d in range(1, 5):
        level = [f * p for f in sorted(level, reverse=True)[:2] for p in probs]
        candidates += level
    for _ in range(40):
        a.observe(Config(4, 7), step([1.0], [0], candidates, 4, dict(draft=1.0, verify=1.0)), 1, HISTORY)

    def speed(c):
        tokens, seconds = a.modelled(c)
        return tokens / seconds

    return max((c for c in a.configs if c.depth), key=speed).width


def test_chooses_the_width_the_text_and_the_costs_call_for():
    """Width 1 (one draft row per level) when only first choices are likely and a second row costs
    as much as the first; width 2 when second choices are likely too and a second row is cheap."""
    assert _modelled_best(0.01, lambda rows: 0.1 * rows) == 1
    assert _modelled_best(0.4, lambda rows: 0.1 + 0.01 * rows) == 2


def test_prices_ngram_branches_by_what_they_would_have_accepted():
    """Decoding plainly, auto scores at each root what n-gram branches would have had accepted once
    the text after it is known: on a text that repeats itself, branches are predicted to pay; on one
    that never does, they are not (and nothing needs a draft to find that out)."""
    def after(text):
        a = Auto(lambda rows: 0.05, lambda rows: 0.2 + 0.002 * rows)
        for length in range(20, len(text)):
            a.observe(Config(0, 0), step([1.0], [0], [1.0], 0, {}), 1, text[:length])
        return a.predicted(Config(0, 0, ngram=NGRAM_ONLY[0])) / a.predicted(Config(0, 0))

    assert after(list(range(12)) * 10) > 3
    assert after(prompt(120, 7)) < 1.05


def test_a_copy_takes_ngram_branches_alone_and_a_switch_to_drafting_pays_the_catch_up():
    """While the text is being copied (its last tokens occurred before, a full n-gram match), every
    step verifies n-gram branches alone, whatever was chosen; and a drafting configuration is
    priced with the draft's catch-up on the tokens committed without it (a new text: its prompt),
    spread over the steps the text has left (at most HORIZON)."""
    a = Auto(lambda rows: 0.01 * rows, lambda rows: 0.2)
    copied = list(range(40)) + list(range(20))  # the last 8+ tokens occurred before
    assert a.choose(0, copied).name == "ngram" and a.current.depth
    assert a.choose(0, prompt(60, 9)) is a.current  # nothing copied: the configuration chosen
    tree = a.current
    a.behind = 0
    cheap = a.predicted(tree)
    a.behind = 300  # ten 32-row draft forwards (3 s here), spread over HORIZON steps
    tokens = a.modelled(tree)[0]
    assert a.predicted(tree) < cheap and a.catch_up_seconds(tree, tokens) == pytest.approx(3.0 / HORIZON, rel=0.05)
    a.left = round(10 * tokens)  # ... or over the 10 steps the text has left
    assert a.catch_up_seconds(tree, tokens) == pytest.approx(3.0 / 10, rel=0.05)
    a.left = 10_000
    assert a.catch_up_seconds(tree, tokens) == pytest.approx(3.0 / HORIZON, rel=0.05)
