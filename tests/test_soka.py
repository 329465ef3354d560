"""SoKA: KPSVD exact facts, term selection, the adapter layer against peft's LoKr, the
peft baselines, the arithmetic task and one short end-to-end run per method."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from compresslab.compress.kpsvd import (
    KneedleElbow,
    KronShape,
    SecondDifferenceElbow,
    TermSelector,
    energy_terms,
    fit_budget,
    kpsvd,
    kron_apply,
    kron_sum,
    near_square_split,
    rearrange,
    unrearrange,
)
from compresslab.data.qa import ArithmeticDataModule, JsonlQADataModule
from compresslab.data.spec import DataSpec
from compresslab.errors import ConfigError
from compresslab.generation import FinalNumber, GenerativeQATask, WholeText, greedy_generate
from compresslab.layers.kronecker import KroneckerAdapterLinear
from compresslab.models.architecture import adapter_for
from compresslab.models.llama import TinyLlama
from compresslab.stages.base import RunContext
from compresslab.stages.peft import (
    MergeAdaptersStage,
    PeftAdapterStage,
    SoKAStage,
    trainable_params,
)
from conftest import TINY_LLAMA, compose_cfg

SHAPE = KronShape(m=3, n=4, p=5, q=2)   # W is 15 x 8


def random_w(shape=SHAPE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape.m * shape.p, shape.n * shape.q, generator=g, dtype=torch.float64)


# -- KPSVD ------------------------------------------------------------------------------------

def test_rearrangement_maps_a_kronecker_product_to_a_rank_one_matrix():
    a, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    r = rearrange(torch.kron(a, b), SHAPE)
    assert torch.allclose(r, torch.outer(a.flatten(), b.flatten()))
    w = random_w()
    assert torch.equal(unrearrange(rearrange(w, SHAPE), SHAPE), w)


def test_full_kpsvd_reconstructs_and_truncation_error_is_tail_energy():
    w = random_w()
    full = kpsvd(w, SHAPE)
    assert len(full.s) == SHAPE.max_terms == 10
    assert torch.allclose(kron_sum(full.a, full.b), w, atol=1e-12)
    for k in (1, 3, 7):
        top = full.truncate(k)
        err = (w - kron_sum(top.a, top.b)).pow(2).sum()
        assert float(err) == pytest.approx(float(full.s[k:].pow(2).sum()), rel=1e-10)


def test_van_loan_identity_for_any_kronecker_product():
    w = random_w()
    a, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    lhs = torch.linalg.norm(w - torch.kron(a, b))
    rhs = torch.linalg.norm(rearrange(w, SHAPE) - torch.outer(a.flatten(), b.flatten()))
    assert float(lhs) == pytest.approx(float(rhs), rel=1e-12)


def test_kronecker_forward_equals_the_materialised_matrix():
    top = kpsvd(random_w(), SHAPE, terms=3)
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    assert torch.allclose(kron_apply(x, top.a, top.b), x @ kron_sum(top.a, top.b).T, atol=1e-12)


def test_near_square_split_and_split_validation():
    assert near_square_split(4096) == (64, 64)
    assert near_square_split(128) == (8, 16)
    assert near_square_split(13) == (1, 13)
    assert KronShape.for_matrix(128, 352) == KronShape(m=8, n=16, p=16, q=22)
    assert KronShape.for_matrix(128, 64, out_split=(4, 32)) == KronShape(4, 8, 32, 8)
    with pytest.raises(ConfigError, match="does not fit"):
        KronShape.for_matrix(128, 64, out_split=(5, 25))


# -- term selection ---------------------------------------------------------------------------

SPECTRUM = torch.tensor([10.0, 9.0, 8.0, 1.0, 0.9, 0.8, 0.7, 0.6])


def test_energy_rule_picks_the_smallest_k_reaching_tau():
    energy = SPECTRUM.pow(2).cumsum(0) / SPECTRUM.pow(2).sum()
    assert energy[1] < 0.9 <= energy[2]
    assert energy_terms(SPECTRUM, 0.9) == 3
    assert energy_terms(SPECTRUM, 1.0) == 8
    assert energy_terms(SPECTRUM, float(energy[4])) == 5


def test_elbow_rules_find_the_knee_of_a_synthetic_spectrum():
    assert SecondDifferenceElbow()(SPECTRUM) == 3
    assert KneedleElbow()(SPECTRUM) == 3
    cliff = torch.tensor([5.0, 0.5, 0.45, 0.4, 0.35])
    assert SecondDifferenceElbow()(cliff) == 1 and KneedleElbow()(cliff) == 1


def test_selector_combines_and_clamps():
    assert TermSelector(tau=0.999, combine="min")(SPECTRUM) == 3
    assert TermSelector(tau=0.999, combine="max")(SPECTRUM) == 8
    assert TermSelector(tau=0.999, combine="max", k_max=5)(SPECTRUM) == 5
    assert TermSelector(tau=0.5, combine="energy", k_min=2)(SPECTRUM) == 2
    with pytest.raises(ConfigError, match="tau"):
        TermSelector(tau=1.5).check()
    with pytest.raises(ConfigError, match="combine"):
        TermSelector(combine="mean").check()


def test_budget_drops_the_terms_of_least_energy_share():
    spectra = {"flat": torch.ones(4), "steep": torch.tensor([10.0, 1.0, 0.1, 0.01])}
    terms = fit_budget({"flat": 4, "steep": 4}, spectra, {"flat": 10, "steep": 10}, budget=50)
    # steep's tail (shares ~1e-2 and less) goes before any flat term (share 0.25)
    assert terms == {"flat": 4, "steep": 1}
    assert fit_budget({"flat": 4}, spectra, {"flat": 10}, None) == {"flat": 4}
    with pytest.raises(ConfigError, match="budget"):
        fit_budget({"flat": 4, "steep": 4}, spectra, {"flat": 10, "steep": 10}, budget=15)


# -- the adapter layer ------------------------------------------------------------------------

def test_adapter_starts_as_the_linear_and_merges_to_its_forward():
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 15)
    x = torch.randn(4, 8)
    for init in ("kpsvd", "zero"):
        layer = KroneckerAdapterLinear.from_linear(linear, SHAPE, terms=2, init=init)
        assert torch.allclose(layer(x), linear(x), atol=1e-6)
        with torch.no_grad():
            layer.a.add_(0.1 * torch.randn_like(layer.a))
            layer.b.add_(0.1 * torch.randn_like(layer.b))
        assert not torch.allclose(layer(x), linear(x), atol=1e-3)
        assert torch.allclose(layer.merged()(x), layer(x), atol=1e-5)


def test_one_term_factor_loaded_into_peft_lokr_gives_the_same_output():
    from peft import LoKrConfig, get_peft_model

    torch.manual_seed(0)
    shape = KronShape.for_matrix(128, 64)          # peft factorises 128 -> 8 x 16, 64 -> 8 x 8
    net = torch.nn.Sequential(torch.nn.Linear(64, 128))
    ours = KroneckerAdapterLinear.from_linear(net[0], shape, terms=1)
    with torch.no_grad():   # move away from the identity so the delta matters
        ours.a.mul_(1.5)
        ours.b.add_(0.05 * torch.randn_like(ours.b))
    lokr = get_peft_model(net, LoKrConfig(r=16, alpha=16, target_modules=["0"]))
    layer = lokr.base_model.model[0]
    assert layer.lokr_w1["default"].shape == ours.a[0].shape
    assert layer.lokr_w2["default"].shape == ours.b[0].shape
    with torch.no_grad():
        layer.base_layer.weight.copy_(ours.residual)
        layer.lokr_w1["default"].copy_(ours.a[0])
        layer.lokr_w2["default"].copy_(ours.b[0])
    x = torch.randn(3, 64)
    assert torch.allclose(layer(x), ours(x), atol=1e-5)


# -- stages on a tiny LLaMA -------------------------------------------------------------------

def tiny_llama():
    torch.manual_seed(0)
    return TinyLlama(hidden_size=32, num_layers=2, num_heads=4,
                     intermediate_size=48).build(DataSpec("text", vocab_size=64)).eval()


def context(model):
    return RunContext(cfg=OmegaConf.create({"progress": False}), run_dir=None,
                      adapter=adapter_for(model), data=None)


def run_stage(stage, model, name="adapt"):
    stage.name = name
    ctx = context(model)
    stage.check(model, ctx)
    return stage.run(model, ctx), ctx


def test_soka_model_at_initialisation_equals_the_original_and_merges_back():
    model = tiny_llama()
    x = torch.randint(0, 64, (2, 10))
    adapter = adapter_for(model)
    with torch.no_grad():
        before = adapter.logits(model, x)
    model, ctx = run_stage(SoKAStage(tau=0.9, combine="max", budget_lora_rank=2,
                                     budget_fraction=0.75), model)
    adapted = [m for m in model.modules() if isinstance(m, KroneckerAdapterLinear)]
    assert len(adapted) == 2 * 5 and len(ctx.plan) == 10
    # only the Kronecker factors train, within 0.75 x LoRA rank 2 on the same linears
    lora2 = sum(2 * (lin.in_features + lin.out_features) for lin in adapted)
    assert ctx.metrics["trainable/params"] == trainable_params(model) <= 0.75 * lora2
    with torch.no_grad():
        assert torch.allclose(adapter.logits(model, x), before, atol=1e-5)
        for layer in adapted:
            layer.a.add_(0.05 * torch.randn_like(layer.a))
        changed = adapter.logits(model, x)
    model, ctx = run_stage(MergeAdaptersStage(), model, "merge")
    assert not any(isinstance(m, KroneckerAdapterLinear) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(adapter.logits(model, x), changed, atol=1e-5)


def test_unmerged_soka_model_saves_and_reloads(tmp_path):
    from compresslab.checkpoints import load_compressed, save_compressed

    model, ctx = run_stage(SoKAStage(terms=2), tiny_llama())
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, KroneckerAdapterLinear):
                layer.b.add_(0.05 * torch.randn_like(layer.b))
    source = {"_target_": "compresslab.models.sources.TinyLlama", "hidden_size": 32,
              "num_layers": 2, "num_heads": 4, "intermediate_size": 48}
    save_compressed(model, tmp_path, {"model": {"source": source}, "layers": ctx.plan,
                                      "data_spec": {"modality": "text", "vocab_size": 64}})
    loaded = load_compressed(tmp_path)
    x = torch.randint(0, 64, (2, 10))
    adapter = adapter_for(model)
    with torch.no_grad():
        assert torch.equal(adapter.logits(loaded, x), adapter.logits(model, x))

@pytest.mark.parametrize("config", ["lora", "pissa", "lokr"])
def test_peft_baselines_adapt_the_adapter_roles_and_merge(config):
    from peft import LoKrConfig, LoraConfig

    partial = {"lora": lambda **kw: LoraConfig(r=2, lora_alpha=2, **kw),
               "pissa": lambda **kw: LoraConfig(r=2, lora_alpha=2, init_lora_weights="pissa",
                                                **kw),
               "lokr": lambda **kw: LoKrConfig(r=8, alpha=8, **kw)}[config]
    model = tiny_llama()
    x = torch.randint(0, 64, (2, 10))
    adapter = adapter_for(model)
    with torch.no_grad():
        before = adapter.logits(model, x)
    model, ctx = run_stage(PeftAdapterStage(partial, roles=["q", "v"]), model)
    assert ctx.metrics["adapt/layers"] == 4
    if config != "lokr":
        assert ctx.metrics["trainable/params"] == 4 * 2 * (32 + 32)
    with torch.no_grad():
        assert torch.allclose(adapter.logits(model, x), before, atol=1e-4)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        changed = adapter.logits(model, x)
    model, _ = run_stage(MergeAdaptersStage(), model, "merge")
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        assert torch.allclose(adapter.logits(model, x), changed, atol=1e-4)


def test_stage_settings_are_checked():
    model = tiny_llama()
    with pytest.raises(ConfigError, match="no layer matches"):
        run_stage(SoKAStage(roles=["nothing"]), model)
    with pytest.raises(ConfigError, match="init must be"):
        run_stage(SoKAStage(init="random"), model)
    with pytest.raises(ConfigError, match="exceeds"):
        run_stage(SoKAStage(terms=1000), model)


# -- the arithmetic task ----------------------------------------------------------------------

def test_answer_extraction():
    assert FinalNumber()("3 + 4 = 7. 7 - 2 = 5. #### 5") == "5"
    assert FinalNumber()("so 1,200 in total") == "1200"
    assert FinalNumber()("no number") is None
    assert WholeText()("def f(x):\n    return x\n") == "def f(x): return x"


def test_arithmetic_problems_are_seeded_correct_and_test_is_held_out():
    dm = ArithmeticDataModule(num_train=300, num_val=20, num_test=40, max_steps=3)
    dm.check()
    splits = {s: dm.examples(s) for s in ("train", "val", "test")}
    again = ArithmeticDataModule(num_train=300, num_val=20, num_test=40, max_steps=3)
    assert again.examples("test") == splits["test"]
    assert not {e.question for e in splits["test"]} & {e.question for e in splits["train"]}
    for ex in splits["train"][:50]:   # the working adds up to the gold answer
        total = int(ex.question.split(" has ")[1].split()[0])
        steps = [s for s in ex.answer.split("####")[0].split(". ") if s.strip()]
        assert 1 <= len(steps) <= 3
        for step in steps:
            lhs, rhs = step.strip(". ").split(" = ")
            assert eval(lhs) == int(rhs) and lhs.startswith(str(total))  # noqa: S307
            total = int(rhs)
        assert str(total) == ex.gold
    with pytest.raises(ConfigError, match="min_steps"):
        ArithmeticDataModule(min_steps=3, max_steps=2).check()


class EchoAdapter:
    """A 'model' that always predicts token ``plan[position]`` (to test decoding)."""

    def __init__(self, plan, vocab):
        self.plan, self.vocab = plan, vocab

    def logits(self, model, inputs):
        b, t = inputs.shape
        out = torch.zeros(b, t, self.vocab)
        for pos in range(t):
            out[:, pos, self.plan[min(pos, len(self.plan) - 1)]] = 1.0
        return out


def test_greedy_generation_reads_each_row_at_its_own_length():
    plan = [5, 6, 7, 8, 9, 1, 1, 1]      # the logits at position i pick plan[i]; 1 is EOS
    prompts = [torch.tensor([2, 2]), torch.tensor([2, 2, 2, 2])]
    out = greedy_generate(None, EchoAdapter(plan, 10), prompts, 10, eos_id=1, pad_id=0)
    assert out == [[6, 7, 8, 9], [8, 9]]


def test_exact_match_counts_correct_generations(tmp_path):
    dm = ArithmeticDataModule(num_train=200, num_val=10, num_test=10, vocab_size=300)
    dm.load()
    batch = next(iter(dm.eval_dataloader("test")))
    task: GenerativeQATask = dm.task
    answers = [g for g in batch["gold"]]
    task.answers = lambda model, adapter, b, rows: [
        f"x #### {answers[i]}" if i < 5 else "#### -1" for i in rows]
    model = tiny_llama()
    model.resize_token_embeddings(dm.tokenizer.vocab_size)
    sums = task.eval_sums(model, adapter_for(model), batch)
    metrics = task.metrics({k: float(v) for k, v in sums.items()})
    assert metrics["exact_match"] == pytest.approx(5 / len(answers))
    assert (batch["labels"][:, 1:] != -100).sum() == sums["tokens"]


class OracleAdapter:
    """Predicts the next token of the reference sequence the input is a prefix of (so
    greedy decoding reproduces it), except for rows listed in ``wrong``."""

    def __init__(self, batch, vocab, wrong):
        self.vocab, self.wrong = vocab, wrong
        self.refs = list(batch["input_ids"])
        self.lengths = [int((lab != -100).nonzero().max()) + 1 for lab in batch["labels"]]

    def logits(self, model, inputs):
        out = torch.zeros(*inputs.shape, self.vocab)
        for row in range(inputs.shape[0]):
            for t in range(inputs.shape[1]):
                nxt = 0
                for k, (ref, n) in enumerate(zip(self.refs, self.lengths)):
                    if t + 1 < n and torch.equal(inputs[row, :t + 1], ref[:t + 1]):
                        nxt = int(ref[t + 1]) if k not in self.wrong else 7
                out[row, t, nxt] = 1.0
        return out


def test_reproduced_answers_skip_generation_with_the_same_result():
    dm = ArithmeticDataModule(num_train=100, num_val=5, num_test=6, vocab_size=300)
    dm.load()
    batch = next(iter(dm.eval_dataloader("test")))
    oracle = OracleAdapter(batch, dm.tokenizer.vocab_size, wrong={1, 4})
    task = dm.task
    known = task.reproduced(oracle.logits(None, batch["input_ids"]), batch["labels"])
    assert known.tolist() == [i not in {1, 4} for i in range(6)]
    generated = task.answers(None, oracle, batch, list(range(6)))
    by_generation = [task.extract(t) == g for t, g in zip(generated, batch["gold"])]
    sums = task.eval_sums(None, oracle, batch)
    assert float(sums["correct"]) == sum(by_generation) == 4

def test_jsonl_loaders_read_gsm8k_and_mbpp_files(tmp_path):
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text("\n".join(json.dumps({"question": f"What is {i} + 1?",
                                         "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"})
                             for i in range(30)))
    dm = JsonlQADataModule(format="gsm8k", train=str(gsm), test=str(gsm), vocab_size=300)
    dm.check()
    dm.load()
    assert dm.examples("test")[3].gold == "4" and len(dm.split("val")) == 30
    mbpp = tmp_path / "mbpp.jsonl"
    mbpp.write_text(json.dumps({"text": "Add one.", "code": "def f(x):\n    return x + 1",
                                "test_list": ["assert f(1) == 2"]}) + "\n")
    dm = JsonlQADataModule(format="mbpp", train=str(mbpp), test=str(mbpp), vocab_size=300)
    ex = dm.examples("train")[0]
    assert ex.question.endswith("assert f(1) == 2") and ex.gold.startswith("def f")
    with pytest.raises(ConfigError, match="does not exist"):
        JsonlQADataModule(format="gsm8k", train="/no/file.jsonl", test=str(gsm)).check()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(ConfigError, match="lacks answer"):
        JsonlQADataModule(format="gsm8k", train=str(bad), test=str(bad)).examples("train")


# -- end to end -------------------------------------------------------------------------------

TINY_ARITH = ["dataset=arithmetic", "dataset.datamodule.num_train=200",
              "dataset.datamodule.num_test=10", "dataset.datamodule.max_new_tokens=16",
              "method.stages.finetune.max_steps=8", "method.stages.finetune.log_every=2",
              "method.stages.finetune.target_loss=0.0"]
PRETRAIN_PYCODE = ["dataset@pretrain_data=pycode"] + [
    a.replace("dataset.", "pretrain_data.", 1) for a in TINY_LLAMA if a.startswith("dataset.")]
OWN = [a for a in TINY_LLAMA if not a.startswith("dataset")]


@pytest.mark.parametrize("method", ["soka", pytest.param("lora", marks=pytest.mark.slow)])
def test_fine_tunes_the_pycode_base_on_arithmetic(method, shared_root, tmp_path):
    from compresslab.pipeline import run

    extra = ["method.budget_lora_rank=2"] if method == "soka" else ["method.rank=2"]
    cfg = compose_cfg([*OWN, *PRETRAIN_PYCODE, *TINY_ARITH, f"method={method}", *extra],
                      shared_root, tmp_path / "run")
    metrics = run(cfg)
    assert 0 < metrics["trainable/params"] < metrics["params/dense"] / 10
    curve = json.loads((tmp_path / "run" / "finetune_loss_curve.json").read_text())
    # a target below any loss is never reached: no steps_to_target is invented
    assert metrics["finetune/steps"] == 8 and metrics["finetune/target_reached"] == 0
    assert "finetune/steps_to_target" not in metrics
    # the smoothed curve is the EMA of the per-step losses, the gradient statistics those
    # of the recorded norms
    ema = [curve["loss"][0]]
    for loss in curve["loss"][1:]:
        ema.append(0.9 * ema[-1] + 0.1 * loss)
    assert curve["smoothed"] == pytest.approx(ema, rel=1e-12)
    norms = torch.tensor(curve["grad_norm"], dtype=torch.float64)
    assert len(norms) == 8 and float(norms.min()) > 0
    assert metrics["finetune/grad_norm_mean"] == pytest.approx(float(norms.mean()))
    assert metrics["finetune/grad_norm_var"] == pytest.approx(float(norms.var(unbiased=False)))
    # exact match is a count of the 10 test answers, not an average over tokens
    assert metrics["test/exact_match"] * 10 == pytest.approx(round(metrics["test/exact_match"]
                                                                   * 10), abs=1e-9)
    assert metrics["test/loss"] < metrics["dense/test_loss"]   # training helped on its own task
    assert metrics["params/compressed"] == metrics["params/dense"]  # merged back
    assert len(curve["loss"]) == 8


def test_steps_to_target_counts_the_smoothed_loss_by_hand():
    from compresslab.callbacks.training_stats import LossTracker

    tracker = LossTracker(target_loss=2.2, smoothing=0.5)
    for step, loss in enumerate([4.0, 2.0, 2.0, 0.0, 0.0]):
        tracker.on_train_batch_end(None, None, torch.tensor(loss), None, step)
    # EMA 4, 3, 2.5, 1.25, 0.625: the raw loss is below 2.2 at step 2, the EMA at step 4
    assert tracker.smoothed == [4.0, 3.0, 2.5, 1.25, 0.625]
    assert tracker.summary() == {"target_reached": 1, "steps_to_target": 4}
    never = LossTracker(target_loss=0.1, smoothing=0.5)
    never.on_train_batch_end(None, None, torch.tensor(1.0), None, 0)
    assert never.summary() == {"target_reached": 0}


def test_grad_norm_statistics_by_hand():
    from types import SimpleNamespace

    from compresslab.callbacks.training_stats import GradNormStats

    stats = GradNormStats(log_every=100)
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    module = SimpleNamespace(parameters=lambda: [a, b])
    trainer = SimpleNamespace(logger=None, world_size=1)
    for ga, gb in (([3.0, 4.0], [0.0]), ([0.0, 12.0], [5.0])):   # norms 5 and 13
        a.grad, b.grad = torch.tensor(ga), torch.tensor(gb)
        stats.on_before_optimizer_step(trainer, module, None)
    assert stats.norms == [5.0, 13.0]
    assert stats.summary() == {"grad_norm_mean": 9.0, "grad_norm_var": 16.0}


@pytest.mark.parametrize("override,message", [
    ("method.tau=2", "tau must lie in \\(0, 1\\]"),
    ("method.stages.adapt.roles=[nothing]", "no layer matches"),
    ("method.stages.adapt.elbow=steepest", "unknown elbow rule"),
])
def test_bad_settings_stop_the_run_before_any_work(override, message, tmp_path):
    from compresslab.pipeline import run

    cfg = compose_cfg([*OWN, *PRETRAIN_PYCODE, *TINY_ARITH, "method=soka", override],
                      tmp_path, tmp_path / "run")
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert not (tmp_path / "base").exists() and not (tmp_path / "run").exists()
