"""Stage purify: accounting, output format, resume, bad input, the captioner, the stage's CLI.

The real stage killed part-way and run as two gloo processes: tests/ddp/test_purify_stage.py."""

from __future__ import annotations

import importlib.util
import json
import tarfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds

from rssqa.data.shards import iter_shard, list_shards, read_sizes
from rssqa.errors import RSSQAError
from rssqa.models.captioner import (
    CaptionVocab,
    GenerationConfig,
    create_captioner,
    export_captioner,
    generate_captions,
    greedy_decode,
    load_captioner,
)
from rssqa.models.clip import create_clip, export_clip
from rssqa.purify_eval import noise_metrics, precision_recall_f1
from rssqa.tasks.purify import (
    FitConfig,
    ModelSpec,
    Purify,
    PurifyTask,
    PurifyWriter,
    keep_fraction_threshold,
    otsu_threshold,
    read_scores,
    sub_caption,
)

ROOT = Path(__file__).resolve().parents[2]
SUMMARY_KEYS = {"n_in", "n_kept", "n_rewritten", "n_dropped", "n_bad", "samples_per_s",
                "noise_precision", "noise_recall", "noise_f1"}  # fmt: skip
GEN = GenerationConfig(max_tokens=8, min_tokens=3, batch_size=32)


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def corpus(tiny_world, tmp_path_factory) -> dict[str, object]:
    return build_corpus(tiny_world, tmp_path_factory.mktemp("extra"))


def build_corpus(tiny_world: Path, extra: Path) -> dict[str, object]:
    """The tiny world's tiers, plus one extra input shard with two corrupt samples (WebDataset TarWriter)."""
    good = list(iter_shard(list_shards(tiny_world / "corpus" / "coarse")[0], decode=False))[:6]
    with wds.TarWriter(str(extra / "extra-000000.tar")) as w:
        for i, s in enumerate(good):
            sample = {"__key__": f"x{i:03d}", "jpg": s["image"], "txt": s["txt"], "json": s["json"]}
            if i == 2:
                sample["jpg"] = b"not a jpeg at all"
            if i == 4:
                del sample["txt"]
            w.write(sample)
    inputs = list_shards(tiny_world / "corpus" / "coarse") + [str(extra / "extra-000000.tar")]
    return {"inputs": inputs, "trusted": str(tiny_world / "corpus" / "trusted")}


@pytest.fixture(scope="session")
def checkpoints(corpus, tmp_path_factory) -> dict[str, str]:
    """Local checkpoints of a (random) filter and captioner, as a user would pass them."""
    out = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    filt, *_ = create_clip("rs-tiny")
    export_clip(filt, "rs-tiny", out / "filter")
    cap, *_ = create_captioner("rs-coca-tiny")
    captions = [s["txt"] for u in list_shards(corpus["trusted"]) for s in iter_shard(u, decode=False)]
    export_captioner(cap, "rs-coca-tiny", out / "captioner", CaptionVocab.build(captions, 2048, cap.context_length))
    return {"filter": str(out / "filter"), "captioner": str(out / "captioner")}


def make_task(corpus, out: Path, checkpoints: dict[str, str] | None = None, **over) -> PurifyTask:
    fit = FitConfig(steps=2, batch_size=8, shuffle=10, num_workers=0)
    kw = dict(
        input=corpus["inputs"],
        trusted=corpus["trusted"],
        out_dir=str(out),
        filter=ModelSpec("rs-tiny", (checkpoints or {}).get("filter"), fit),
        captioner=ModelSpec("rs-coca-tiny", (checkpoints or {}).get("captioner"), fit),
        keep_fraction=0.6,
        reference_size=16,
        generation=GEN,
        batch_size=16,
        num_workers=0,
        examples=3,
        wandb=False,
        threads=1,
    )
    kw.update(over)
    return PurifyTask(**kw)


def run(task: PurifyTask) -> dict:
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    return Purify(task, trainer, {"accelerator": "cpu", "devices": 1}).run()


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, _, ext = m.name.partition(".")
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def input_keys(inputs: list[str]) -> list[str]:
    keys = []
    for url in inputs:
        with tarfile.open(url) as tar:
            keys += sorted({m.name.partition(".")[0] for m in tar.getmembers()})
    return keys


@pytest.fixture(scope="module")
def finished(corpus, checkpoints, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("purify") / "purify"
    return out, run(make_task(corpus, out, checkpoints))


# ------------------------------------------------------------------------------------------------ the stage
def test_summary_accounting_and_keys(finished, corpus):
    out, summary = finished
    assert set(summary) >= SUMMARY_KEYS
    assert summary["n_in"] == len(input_keys(corpus["inputs"]))
    assert summary["n_in"] == summary["n_kept"] + summary["n_rewritten"] + summary["n_dropped"] + summary["n_bad"]
    assert summary["n_bad"] == 2
    assert json.loads((out / "summary.json").read_text())["n_in"] == summary["n_in"]
    assert 0 <= summary["noise_f1"] <= 1 and summary["samples_per_s"] > 0
    assert 0 < summary["model_compute_share"] <= 1 and summary["world_size"] == 1


def test_every_input_sample_is_accounted_for_exactly_once(finished, corpus):
    out, _ = finished
    seen = []
    for marker in sorted((out / "done").glob("*.json")):
        m = json.loads(marker.read_text())
        seen += [r["key"] for r in m["records"]] + [b["key"] for b in m["bad"]]
    assert sorted(seen) == sorted(input_keys(corpus["inputs"]))
    written = [k for p in sorted((out / "shards").glob("*.tar")) for k in read_tar(p)]
    assert len(written) == len(set(written))


def test_output_shards_keep_original_and_chosen_captions(finished):
    out, summary = finished
    sizes = read_sizes(out / "shards")
    assert sum(sizes.values()) == summary["n_kept"] + summary["n_rewritten"]
    threshold = summary["threshold"]
    decisions = set()
    for path in sorted((out / "shards").glob("*.tar")):
        samples = read_tar(path)
        assert len(samples) == sizes[path.name]
        for members in samples.values():
            meta = json.loads(members["json"])
            p = meta["purify"]
            decisions.add(p["decision"])
            assert members["txt"].decode() == p["caption"]
            assert "truth" in meta and "tier" in meta  # the source meta is kept
            assert "jpg" in members
            if p["decision"] == "kept":
                assert p["rule"] is None and p["score"] >= threshold
            else:
                assert p["decision"] == "rewritten" and p["gen_score"] >= threshold and p["caption"] == p["generated"]
                assert p["original_caption"] != p["caption"]
    assert "kept" in decisions
    # the purified shards read like raw ones
    assert sum(1 for _ in iter_shard(str(sorted((out / "shards").glob("*.tar"))[0]))) > 0


def test_bad_samples_are_logged_with_key_and_shard(finished):
    out, _ = finished
    markers = [json.loads(p.read_text()) for p in sorted((out / "done").glob("*.json"))]
    bad = {(b["key"], m["url"].split("/")[-1]) for m in markers for b in m["bad"]}
    assert bad == {("x002", "extra-000000.tar"), ("x004", "extra-000000.tar")}


def test_examples_table_written(finished):
    out, _ = finished
    lines = (out / "examples.csv").read_text().splitlines()
    assert lines[0] == "key,decision,rule,before,after,score,after_score"
    assert len(lines) > 1


def test_keep_fraction_sets_the_global_threshold(finished):
    out, summary = finished
    scores = []
    for p in sorted((out / "rounds" / "0" / "scores").glob("*.json")):
        d = json.loads(p.read_text())
        scores += [s for s, r in zip(d["scores"], d["rules"], strict=True) if r is None]
    assert summary["threshold"] == keep_fraction_threshold(read_scores(out / "rounds" / "0" / "scores", 5), 0.6)
    assert np.mean(np.asarray(scores) >= summary["threshold"]) == pytest.approx(0.6, abs=0.02)


def test_rewrites_must_clear_the_kept_captions_bar(corpus, checkpoints, tmp_path):
    out = tmp_path / "purify"
    summary = run(make_task(corpus, out, checkpoints, rewrite_quantile=0.5))
    scores = read_scores(out / "rounds" / "0" / "scores", 5)
    bar = float(np.quantile(scores[scores >= summary["threshold"]], 0.5, method="lower"))
    assert summary["rewrite_threshold"] == bar > summary["threshold"]
    generated = [r for f in sorted((out / "done").glob("*.json")) for r in json.loads(f.read_text())["records"]
                 if r["generated"] is not None]  # fmt: skip
    assert generated
    for r in generated:  # a rewrite above the keep threshold but under the bar is dropped
        clears = r["gen_rule"] is None and r["gen_score"] >= bar
        assert r["decision"] == ("rewritten" if clears else "dropped"), r["key"]


def test_resume_after_a_failure_gives_the_same_output(finished, corpus, checkpoints, tmp_path, monkeypatch):
    reference, _ = finished
    out = tmp_path / "purify"
    original = PurifyWriter.finish
    calls = []

    def failing(self, index, url, parts):
        calls.append(index)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        original(self, index, url, parts)

    monkeypatch.setattr(PurifyWriter, "finish", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(make_task(corpus, out, checkpoints))
    assert len(list((out / "done").glob("*.json"))) == 2 and not (out / "summary.json").exists()
    monkeypatch.setattr(PurifyWriter, "finish", original)
    run(make_task(corpus, out, checkpoints))
    for path in sorted((reference / "shards").glob("*.tar")):
        assert (out / "shards" / path.name).read_bytes() == path.read_bytes()
    for path in sorted((reference / "done").glob("*.json")):
        a, b = json.loads(path.read_text()), json.loads((out / "done" / path.name).read_text())
        assert a["records"] == b["records"] and a["bad"] == b["bad"]


@pytest.mark.slow
def test_fit_fixed_threshold_and_bootstrap_rounds(corpus, tmp_path):
    out = tmp_path / "purify"
    summary = run(make_task(corpus, out, None, keep_fraction=None, threshold=0.0, rounds=2, bootstrap=True, bootstrap_steps=1))
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    for r in summary["rounds"]:
        assert r["n_in"] == r["n_kept"] + r["n_rewritten"] + r["n_dropped"] + r["n_bad"]
        assert r["threshold"] == 0.0
    for r in (0, 1):
        assert (out / "rounds" / str(r) / "filter" / "open_clip_config.json").is_file()
        assert (out / "rounds" / str(r) / "captioner" / "caption_vocab.json").is_file()
    assert (out / "rounds" / "0" / "shards" / "sizes.json").is_file() and (out / "shards" / "sizes.json").is_file()
    assert (out / "logs" / "metrics.csv").is_file()


def test_otsu_threshold_splits_two_groups():
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0.1, 0.1, 300), rng.normal(0.6, 0.05, 700)])
    t = otsu_threshold(scores)
    assert 0.25 < t < 0.5
    assert np.mean(scores[300:] >= t) > 0.99 and np.mean(scores[:300] < t) > 0.9


def test_sub_caption_keeps_a_subset_of_phrases_in_order():
    text = "An aerial image of a town with 12 houses, some trees and a river."
    phrases = ["An aerial image of a town", "12 houses", "some trees", "a river"]
    rng = np.random.default_rng(0)
    for _ in range(30):
        parts = sub_caption(text, rng).split(", ")
        assert parts and all(p in phrases for p in parts)
        assert [phrases.index(p) for p in parts] == sorted(phrases.index(p) for p in parts)
    assert sub_caption("a stretch of coastline", rng) == "a stretch of coastline"


# ------------------------------------------------------------------------------------------------ bad input
def test_clear_errors_before_any_work(corpus, checkpoints, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "never"
    cases = [
        ({"trusted": str(empty)}, "no trusted tier"),
        ({"input": str(empty)}, "empty shard list"),
        ({"filter": ModelSpec("rs-tiny", str(tmp_path / "missing.safetensors"))}, "not found"),
        ({"filter": ModelSpec("rs-small", checkpoints["filter"])}, "does not match"),
        ({"captioner": ModelSpec("rs-coca-tiny", checkpoints["filter"])}, "does not match|caption_vocab"),
        ({"captioner": ModelSpec("rs-tiny")}, "not a CoCa"),
        ({"keep_fraction": None}, "exactly one"),
        ({"rounds": 2}, "bootstrap"),
        ({"rewrite_quantile": 1.5}, "rewrite_quantile"),
        ({"keep_fraction": None, "threshold": 0.3, "rewrite_quantile": 0.5}, "needs a score pass"),
    ]
    for over, message in cases:
        with pytest.raises(RSSQAError, match=message):
            make_task(corpus, out, checkpoints, **over)
    assert not out.exists()


def test_max_tokens_beyond_the_captioner_context_fails_at_start(corpus, checkpoints, tmp_path):
    out = tmp_path / "never"
    long = GenerationConfig(max_tokens=40, min_tokens=3, batch_size=32)
    # a settings error: raised before any shard is listed or model built (the missing input is not reported)
    with pytest.raises(RSSQAError, match=r"^generation\.max_tokens: 40 is more than the captioner rs-coca-tiny's context length 32$"):
        make_task(corpus, out, None, generation=long, input=str(tmp_path / "missing"))
    # a local checkpoint folder: the limit comes from its open_clip config
    with pytest.raises(RSSQAError, match=r"generation\.max_tokens: 40 .*context length 32"):
        make_task(corpus, out, checkpoints, generation=long)
    assert make_task(corpus, out, checkpoints, generation=GenerationConfig(max_tokens=32, min_tokens=3)).cfg.generation.max_tokens == 32
    cases = [
        ({"generation": GenerationConfig(max_tokens=8, min_tokens=3, batch_size=0)}, "generation.batch_size: must be >= 1"),
        ({"filter": ModelSpec("rs-tiny", None, FitConfig(batch_size=0))}, "filter.fit.batch_size: must be >= 1"),
        ({"captioner": ModelSpec("rs-coca-tiny", None, FitConfig(batch_size=-1))}, "captioner.fit.batch_size: must be >= 1"),
    ]
    for over, message in cases:
        with pytest.raises(RSSQAError, match=message):
            make_task(corpus, out, **over)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ captioner
def test_caption_vocab_round_trip(corpus):
    captions = [s["txt"] for u in list_shards(corpus["trusted"]) for s in iter_shard(u, decode=False)]
    vocab = CaptionVocab.build(captions, 2048, 40)
    tokens = vocab(captions[:3])
    assert tokens.shape == (3, 40) and int(tokens.max()) < len(vocab)
    assert vocab.decode(tokens) == [c.lower() for c in captions[:3]]
    assert vocab(["zebra giraffe"])[0, 1].item() == CaptionVocab.UNK


def test_greedy_decoding_is_deterministic_and_batch_invariant(checkpoints):
    model, _, _, vocab = load_captioner(checkpoints["captioner"])
    images = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    a = greedy_decode(model, images, 8, 3, vocab.SOT, vocab.EOT)
    b = torch.cat([greedy_decode(model, images[i : i + 1], 8, 3, vocab.SOT, vocab.EOT) for i in range(5)])
    assert torch.equal(a, b)
    assert (a[:, 0] == vocab.SOT).all() and ((a == vocab.EOT).sum(1) == 1).all()
    assert generate_captions(model, images, GEN, vocab) == generate_captions(model, images, GEN, vocab)
    with pytest.raises(RSSQAError, match="CaptionVocab"):
        generate_captions(model, images, GEN, None)


def test_fresh_captioner_is_initialised_reproducibly():
    torch.manual_seed(3)
    a, *_ = create_captioner("rs-coca-tiny")
    torch.manual_seed(3)
    b, *_ = create_captioner("rs-coca-tiny")
    pa, pb = a.text_decoder.text_projection.detach(), b.text_decoder.text_projection.detach()
    assert torch.equal(pa, pb) and 0.05 < float(pa.std()) < 0.2


# ------------------------------------------------------------------------------------------------ evaluation
def test_noise_metrics_against_truth():
    def rec(decision, noisy):
        return {"decision": decision, "meta": {"truth": {"noisy": noisy, "noise": "url" if noisy else None}}}

    records = [rec("kept", False)] * 6 + [rec("dropped", False)] + [rec("rewritten", True)] * 3 + [rec("kept", True)]
    m = noise_metrics([{"records": records}])
    assert m["noise_confusion"] == {"tp": 3, "fp": 1, "fn": 1, "tn": 6}
    assert (m["noise_precision"], m["noise_recall"]) == (0.75, 0.75)
    assert m["noise_per_kind"]["url"]["flagged"] == 3
    assert noise_metrics([{"records": [{"decision": "kept", "meta": {}}]}]) == {}
    assert precision_recall_f1(0, 0, 0) == (0.0, 0.0, 0.0)


# ------------------------------------------------------------------------------------------------ the stage's CLI
def stage_args(corpus, out: Path, *extra: str) -> list[str]:
    """Arguments of stages/purify.py on the tiny corpus: tiny fits, short captions, no W&B."""
    return [
        "--config", str(ROOT / "conf" / "smoke" / "purify.yaml"),
        "--model.input", json.dumps(corpus["inputs"]), "--model.trusted", corpus["trusted"], "--out", str(out),
        "--model.filter.fit.steps", "3", "--model.filter.fit.batch_size", "8",
        "--model.captioner.fit.steps", "3", "--model.captioner.fit.batch_size", "8",
        "--model.generation.max_tokens", "8", "--model.batch_size", "16", "--model.reference_size", "16",
        "--model.wandb", "false", "--model.threads", "1", *extra,
    ]  # fmt: skip


def stage_main():
    spec = importlib.util.spec_from_file_location("purify_stage", ROOT / "stages" / "purify.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_stage_cli_refuses_bad_config_before_any_work(corpus, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RSSQAError, match="purify.trusted: .*no trusted tier"):
        stage_main()(stage_args(corpus, tmp_path / "x", "--model.trusted", str(empty)))
    assert not (tmp_path / "x").exists()


def test_stage_checks_the_settings_for_dry_runs_too(corpus, tmp_path, capsys):
    too_long = ("--model.generation.max_tokens", "40")
    with pytest.raises(RSSQAError, match=r"^generation\.max_tokens: 40 is more than the captioner rs-coca-tiny's context length 32$"):
        stage_main()(stage_args(corpus, tmp_path / "x", *too_long, "--dry_run", "true"))
    assert "purify -> " not in capsys.readouterr().out
    with pytest.raises(RSSQAError, match=r"generation: need 2 <= min_tokens < max_tokens, got 9, 8"):
        stage_main()(stage_args(corpus, tmp_path / "x", "--model.generation.min_tokens", "9", "--dry_run", "true"))
    with pytest.raises(RSSQAError, match=r"generation\.max_tokens: 40 "):  # and without --dry_run, before any work
        stage_main()(stage_args(corpus, tmp_path / "x", *too_long))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("profile", ["smoke", "paper"])
def test_stage_dry_run_prints_the_plan(profile, capsys):
    conf = str(ROOT / "conf" / profile / "purify.yaml")
    with pytest.raises(SystemExit) as stop:
        stage_main()(["--config", conf, "--out", f"runs/{profile}/purify", "--dry_run", "true"])
    assert stop.value.code == 0
    plan = capsys.readouterr().out
    assert "purify -> " in plan and "filter:" in plan and "captioner:" in plan
    if profile == "paper":
        assert "8500 shards" in plan and "ViT-L-14" in plan and "128 process(es)" in plan
