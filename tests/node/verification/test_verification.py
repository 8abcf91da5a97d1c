"""Answers from the engine, signed, re-checked by the teacher-forced verifier: honest answers
pass; edited tokens, wrong seeds, another model, altered prompts and forged receipts fail."""

from __future__ import annotations


import pytest

from node.api.service import answer_file
from node.runtime.loading import load_model
from node.runtime.model_runtime import CacheLimits
from tests.node.runtime.engine_helpers import generate
from tests.models_fixtures import home_sharing, make_tiny_hf_checkpoint
from verify.evidence import AnswerFile, Fingerprint, sign_answer
from verify.identity import NodeKey
from verify.sampling import SamplingParams
from verify.verifier import WrongModelError, verify_answer

LIMITS = CacheLimits(max_batch_size=4, max_total_tokens=1024, prefill_chunk=64)


@pytest.fixture(scope="module")
def models(tmp_path_factory, store):
    root = tmp_path_factory.mktemp("verif")
    ours = load_model(str(make_tiny_hf_checkpoint(root / "ours", seed=0)), device="cpu", limits=LIMITS, root=store)
    other = load_model(str(make_tiny_hf_checkpoint(root / "other", seed=1)), device="cpu", limits=LIMITS, root=store)
    return ours, other


KEY = NodeKey.generate()


def signed_claim(model_id: str, prompt_ids, output_ids, params: SamplingParams, fingerprints) -> AnswerFile:
    """A cheater's answer: internally consistent and validly signed, but not honestly computed."""
    return sign_answer(KEY, model_id=model_id, backend="tvm/llvm/fp32", prompt_ids=prompt_ids, output_ids=output_ids, params=params,
                       fingerprints=fingerprints, finish_reason="length")


@pytest.mark.parametrize("temperature", [0.0, 0.8, 1.5])
def test_honest_answers_pass(models, temperature):
    ours, _ = models
    result = generate(ours, "Hello there", temperature=temperature)
    answer = answer_file(result, KEY, model_id=ours.model_id, backend=ours.backend)
    verdict = verify_answer(AnswerFile.model_validate_json(answer.model_dump_json()), ours)
    assert verdict.verdict == "pass", verdict
    assert verdict.max_logit_diff < 1e-5  # same backend: bit-for-bit or nearly


def test_edited_token_is_caught(models):
    ours, _ = models
    r = generate(ours, "Hello there", temperature=0.0)
    edited = list(r.output_ids)
    edited[3] = (edited[3] + 1) % ours.vocab_size
    verdict = verify_answer(signed_claim(ours.model_id, r.prompt_ids, edited, r.params, r.fingerprints), ours)
    assert verdict.verdict == "fraud"
    assert any(f.position == 3 and f.check == "sampling" for f in verdict.failures)


def test_tokens_not_drawn_with_the_committed_seed_are_caught(models):
    ours, _ = models
    drawn = generate(ours, "Hello there", temperature=1.0, seed=111)
    claimed = drawn.params.model_copy(update={"seed": 222})
    verdict = verify_answer(signed_claim(ours.model_id, drawn.prompt_ids, drawn.output_ids, claimed, drawn.fingerprints), ours)
    assert verdict.verdict == "fraud" and verdict.reasons == ["sampling check failed"]


def test_another_model_claiming_ours_is_caught(models):
    ours, other = models
    cheap = generate(other, "Hello there", temperature=0.0)
    verdict = verify_answer(signed_claim(ours.model_id, cheap.prompt_ids, cheap.output_ids, cheap.params, cheap.fingerprints), ours)
    assert verdict.verdict == "fraud"
    assert "fingerprint check failed" in verdict.reasons


def test_tampered_evidence_and_replays_are_nobodys(models):
    """Evidence that is not what the node signed proves nothing against it (anyone holding an
    honest receipt could alter its evidence): ``unattributable``, before any model work."""
    ours, _ = models
    a = answer_file(generate(ours, "Hello there"), KEY, model_id=ours.model_id, backend=ours.backend)
    b = answer_file(generate(ours, "Paris is"), KEY, model_id=ours.model_id, backend=ours.backend)
    ev = a.evidence
    cases = {
        "output_hash": a.model_copy(update={"evidence": ev.model_copy(update={"output_ids": ev.output_ids[:-1] + [7]})}),
        "request_hash": a.model_copy(update={"evidence": ev.model_copy(update={"prompt_ids": ev.prompt_ids[1:]})}),
        "replay": a.model_copy(update={"evidence": b.evidence}),
        "signature": a.model_copy(update={"receipt": a.receipt.model_copy(update={"backend": "cuda"})}),
    }
    for name, forged in cases.items():
        verdict = verify_answer(forged, ours)
        assert verdict.verdict == "unattributable", name
        assert verdict.reasons and not verdict.failures, name  # caught before any model work
    with pytest.raises(WrongModelError):  # another model's answer: no verdict can be given here
        verify_answer(a.model_copy(update={"receipt": a.receipt.model_copy(update={"model_id": "0" * 64})}), ours)


def test_proofmesh_verify_command(models, tmp_path, store):
    import json
    import os
    import subprocess
    import sys

    ours, _ = models
    good = answer_file(generate(ours, "Hello there", temperature=0.8), KEY, model_id=ours.model_id, backend=ours.backend)
    r = generate(ours, "Hello there", temperature=0.0)
    bad = signed_claim(ours.model_id, r.prompt_ids, [(t + 1) % ours.vocab_size for t in r.output_ids], r.params, r.fingerprints)
    env = {**os.environ, "PROOFMESH_HOME": str(home_sharing(tmp_path / "home", store))}  # the library `models` built

    def verify_cli(path, *extra):
        return subprocess.run([sys.executable, "-m", "node.cli", "verify", str(path), "--model", str(ours.path), "--device", "cpu", *extra],
                              capture_output=True, text=True, env=env, timeout=300)

    codes = {}
    for name, answer in (("good", good), ("bad", bad)):
        path = tmp_path / f"{name}.json"
        path.write_text(answer.model_dump_json())
        out = verify_cli(path, "--proof-out", str(tmp_path / f"{name}.proof.json"))
        codes[name] = (out.returncode, out.stdout)
    assert codes["good"][0] == 0 and '"verdict": "pass"' in codes["good"][1]
    assert codes["bad"][0] == 1 and '"verdict": "fraud"' in codes["bad"][1]
    assert not (tmp_path / "good.proof.json").exists()

    # The fraud proof written for the bad answer is re-checked from scratch: upheld (exit 1).
    upheld = verify_cli(tmp_path / "bad.proof.json")
    assert upheld.returncode == 1 and '"upheld": true' in upheld.stdout

    # Malformed evidence the node signed (fingerprints emptied): a verdict and exit 2, one line why.
    emptied = signed_claim(ours.model_id, r.prompt_ids, r.output_ids, r.params, [Fingerprint(ids=[], logits=[], token_logit=0.0, log_normalizer=0.0)] * len(r.output_ids))
    (tmp_path / "emptied.json").write_text(emptied.model_dump_json())
    out = verify_cli(tmp_path / "emptied.json")
    assert out.returncode == 2 and '"verdict": "malformed"' in out.stdout and "Traceback" not in out.stderr
    assert "unusable answer file (malformed): fingerprints must hold 8 distinct token ids" in out.stderr
    # A NaN logit (JSON writers may spell it) is refused as input, never a traceback.
    (tmp_path / "nan.json").write_text(good.model_dump_json().replace(str(good.evidence.fingerprints[0].logits[0]), "NaN", 1))
    nan = verify_cli(tmp_path / "nan.json")
    assert nan.returncode == 2 and "not a valid answer file" in nan.stderr and "Traceback" not in nan.stderr

    # Binding from the shell: the client's request and what it received (here rebuilt from the answer).
    request = {"model": "tiny", "prompt": good.evidence.prompt_ids, "max_tokens": good.evidence.sampling.max_tokens,
               "temperature": good.evidence.sampling.temperature}
    proof = {"receipt": good.receipt.model_dump(mode="json"), "signature": good.signature, "public_key": good.public_key}
    text = ours.tokenizer.decode([t for t in good.evidence.output_ids if t not in ours.eos_token_ids])
    for name, shown, code in (("bound", text, 0), ("swapped", text + " and more", 1)):
        (tmp_path / "request.json").write_text(json.dumps(request))  # no seed: the node drew it, as the receipt says
        (tmp_path / "response.json").write_text(json.dumps({"choices": [{"index": 0, "text": shown, "proofmesh": proof,
                                                                          "finish_reason": good.receipt.finish_reason}]}))
        bound = verify_cli(tmp_path / "good.json", "--request", str(tmp_path / "request.json"), "--response", str(tmp_path / "response.json"))
        assert bound.returncode == code, (name, bound.stdout, bound.stderr)
    assert "the text received is not what the committed output ids decode to" in bound.stderr

    (tmp_path / "junk.json").write_text('{"version": 1}')
    junk = verify_cli(tmp_path / "junk.json")
    assert junk.returncode == 2 and "not a valid answer file" in junk.stderr and "Traceback" not in junk.stderr
