"""ami-generate end to end: what it writes for files and standard input is what the decoding library finds,
in every mode; sampling is reproducible however the input is batched; an interactive dialog through a
pseudo-terminal keeps the history the model was trained with; bad input is one line and exit code 2."""

from __future__ import annotations

import math
import os
import pty
import re
import select
import subprocess
import time
from pathlib import Path

import pytest
import torch

from ami_dist.data.batching import make_batch
from ami_dist.data.vocab import SPECIALS, WordVocab
from ami_dist.decoding.rerank import Reranker
from ami_dist.decoding.strategy import Strategy, decode_all
from ami_dist.export import load_exported, write_model_file
from ami_dist.models import ModelConfig, build_model
from ami_dist.training.losses import token_nll
from tests.conftest import PYTHON, ROOT, subprocess_env

WORDS = ("hello there how are you fine i am good like cats dogs the a is it what do play music today "
         "yes no maybe why tell me more about your day").split()
ANSWER = re.compile(r"^(\d+)\t([^\t]*)\t(.*)$")


def _fit(model: torch.nn.Module, vocab: WordVocab, seed: int, steps: int = 150) -> None:
    """A few Adam steps on a toy task (answer with the source's words shifted by one, reversed), so that outputs
    are words that vary with the source and end, as a trained model's do."""
    gen = torch.Generator().manual_seed(seed)
    first, count = len(SPECIALS) + 1, len(WORDS)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        lengths = torch.randint(1, 7, (32,), generator=gen).tolist()
        src = [torch.randint(0, count, (n,), generator=gen).tolist() for n in lengths]
        tgt = [[first + (w + 1) % count for w in reversed(s)] for s in src]
        batch = make_batch([[first + w for w in s] for s in src], tgt, vocab.pad_id, vocab.bos_id, vocab.eos_id)
        loss, tokens = token_nll(model(batch.src, batch.src_lengths, batch.tgt_in), batch.tgt_out, vocab.pad_id)
        optimiser.zero_grad()
        (loss / tokens).backward()
        optimiser.step()


def make_model(path: Path, *, dialog: bool, max_src_len: int = 100, persona: bool = False) -> Path:
    """A model file of two small LSTMs over a word vocabulary, briefly trained on a toy task."""
    vocab = WordVocab([*SPECIALS, "<sep>", *WORDS])
    cfg = ModelConfig(emb_dim=16, hidden_size=32, enc_layers=1, dec_layers=1, dropout=0.0)
    networks = {}
    for name, seed in (("forward", 1), ("backward", 2)):
        torch.manual_seed(seed)
        model = build_model(cfg, len(vocab), vocab.pad_id)
        _fit(model, vocab, seed)
        networks[name] = {k: v.detach().clone() for k, v in model.eval().state_dict().items()}
    data = {"format": "personachat" if dialog else "parallel", "max_src_len": max_src_len, "lowercase": False,
            "max_history_turns": 2, "include_persona": persona, "max_line_chars": 10000}
    source = {"run_dir": "", "tag": "step0", "mlflow_run_id": "", "tracking_uri": "", "experiment": "tests",
              "task": "dialog" if dialog else "nmt", "data": data, "eval": {"max_len_a": 1.5, "max_len_b": 6},
              "licenses": {"ami-dist": "Apache-2.0", "data": None}}
    return write_model_file(path, cfg, vocab, networks, source)


@pytest.fixture(scope="module")
def nmt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("gen") / "nmt.pt", dialog=False, max_src_len=6)


def generate(model: Path, *args: str, stdin: bytes | None = None, expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([PYTHON, "-m", "ami_dist.generate", "--model", str(model), *args], input=stdin,
                          cwd=ROOT, env=subprocess_env(), capture_output=True, timeout=300)
    assert proc.returncode == expect, proc.stderr.decode()[-3000:]
    if expect == 2:
        err = proc.stderr.decode()
        assert err.startswith("ami-dist: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return proc


def expected(model: Path, lines: list[str], strategy: Strategy, limit: int = 100) -> list[list[tuple[float, str]]]:
    """(score, text) of every hypothesis the library finds for ``lines`` taken as plain sources."""
    exported = load_exported(model)
    vocab = exported.vocab
    sources = [vocab.encode(line)[:limit] for line in lines]
    found = decode_all(strategy, exported.networks["forward"], exported.networks["backward"], sources, vocab, 2)
    return [[(h.score, vocab.decode(h.tokens)) for h in hyps] for hyps in found]


def parse(stdout: bytes) -> list[tuple[int, float, str]]:
    rows = []
    for line in stdout.decode().splitlines():
        number, score, text = ANSWER.match(line).groups()
        rows.append((int(number), float(score) if score else math.nan, text))
    return rows


LINES = ["hello there how are you", "what do you like", "", "i like cats and dogs today yes"]  # "and": unknown


def test_greedy_and_n_best_beam_write_what_the_library_finds(nmt: Path, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("\n".join(LINES) + "\n", encoding="utf-8")
    greedy = generate(nmt, "--input", str(tmp_path / "in.txt"))
    want = expected(nmt, LINES, Strategy("greedy", max_len_a=1.5, max_len_b=6), limit=6)
    assert greedy.stdout.decode().split("\n")[:-1] == [hyps[0][1] for hyps in want]
    assert greedy.stdout.decode().split("\n")[2] == ""  # the empty line's empty answer
    assert "in.txt:4: 7 tokens, more than the model was trained on (data.max_src_len = 6): kept the first 6" \
        in greedy.stderr.decode()
    piped = generate(nmt, stdin=(tmp_path / "in.txt").read_bytes())
    assert piped.stdout == greedy.stdout and "<stdin>:4: 7 tokens" in piped.stderr.decode()

    beam = parse(generate(nmt, "--input", str(tmp_path / "in.txt"), "--beam", "4", "--n_best", "3").stdout)
    want = expected(nmt, LINES, Strategy("beam", beam=4, pool=3, max_len_a=1.5, max_len_b=6), limit=6)
    assert [r[0] for r in beam] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    for number in (1, 2, 4):
        rows = [r for r in beam if r[0] == number]
        assert [r[2] for r in rows] == [text for _, text in want[number - 1]]
        assert [r[1] for r in rows] == pytest.approx([score for score, _ in want[number - 1]], abs=1e-4)
        assert [r[1] for r in rows] == sorted((r[1] for r in rows), reverse=True)
    assert all(r[2] == "" and math.isnan(r[1]) for r in beam if r[0] == 3)

    mmi = parse(generate(nmt, "--input", str(tmp_path / "in.txt"), "--beam", "4", "--rerank", "mmi",
                         "--mmi_alpha", "1.0", "--scores").stdout)
    want = expected(nmt, LINES, Strategy("beam", beam=4, pool=4, max_len_a=1.5, max_len_b=6,
                                         rerank=Reranker("mmi", 1.0, 0.0)), limit=6)
    best = [hyps[0] for i, hyps in enumerate(want) if i != 2]
    assert [r[2] for r in mmi if r[0] != 3] == [text for _, text in best]
    assert [r[1] for r in mmi if r[0] != 3] == pytest.approx([score for score, _ in best], abs=1e-4)


def test_samples_are_the_same_for_a_seed_whatever_the_batch_size(nmt: Path) -> None:
    stdin = ("\n".join(LINES) + "\n").encode()
    args = ("--sample", "--num_samples", "3", "--top_p", "0.9", "--temperature", "1.5", "--seed", "4")
    first = generate(nmt, *args, stdin=stdin)
    assert generate(nmt, *args, "--batch_size", "1", stdin=stdin).stdout == first.stdout
    rows = parse(first.stdout)
    assert [r[0] for r in rows] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    want = expected(nmt, LINES, Strategy("sample", num_samples=3, top_p=0.9, temperature=1.5, seed=4,
                                         max_len_a=1.5, max_len_b=6), limit=6)
    assert [r[2] for r in rows if r[0] != 3] == [text for i, hyps in enumerate(want) if i != 2 for _, text in hyps]
    other = parse(generate(nmt, *args[:-1], "5", stdin=stdin).stdout)
    assert [r[2] for r in other] != [r[2] for r in rows]  # another seed, other samples
    best = generate(nmt, *args, "--n_best", "1", "--rerank", "backward", stdin=stdin).stdout.decode().split("\n")
    assert len(best) == len(LINES) + 1


@pytest.mark.parametrize(("args", "message"), [
    (("--temperature", "warm"), "argument --temperature: invalid float value: 'warm'"),
    (("--sample", "--top_p", "0"), "--top_p must be in (0, 1], got 0.0"),
    (("--sample", "--top_p", "1.5"), "--top_p must be in (0, 1], got 1.5"),
    (("--beam", "2", "--n_best", "3"), "--n_best must be between 1 and --beam (2), got 3"),
    (("--rerank", "mmi"), "--rerank needs candidates to reorder"),
])
def test_bad_arguments_are_one_line_and_exit_2(nmt: Path, args: tuple[str, ...], message: str) -> None:
    assert message in generate(nmt, *args, stdin=b"hello\n", expect=2).stderr.decode()


def test_a_missing_model_or_a_nul_byte_is_one_line_and_exit_2(nmt: Path, tmp_path: Path) -> None:
    missing = generate(tmp_path / "nope.pt", stdin=b"hello\n", expect=2)
    assert f"{tmp_path / 'nope.pt'}: model file not found" in missing.stderr.decode()
    nul = generate(nmt, stdin=b"hello\nhow\x00are\n", expect=2)
    assert "<stdin>:2: NUL byte at column 4" in nul.stderr.decode()
    assert nul.stdout.decode().count("\n") == 1  # the good line before it was answered
    assert "nope.txt: file not found" in generate(nmt, "--input", str(tmp_path / "nope.txt"),
                                                  expect=2).stderr.decode()


class Terminal:
    """ami-generate --interactive on a pseudo-terminal, driven as a person would type."""

    def __init__(self, model: Path, *args: str) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([PYTHON, "-m", "ami_dist.generate", "--model", str(model), "--interactive",
                                      "--scores", *args], stdin=slave, stdout=slave, stderr=slave, cwd=ROOT,
                                     env=subprocess_env(), close_fds=True)
        os.close(slave)
        self.transcript = ""
        self.prompts = 0
        self.wait_for_prompt()

    def wait_for_prompt(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.transcript.count("> ") <= self.prompts:
            assert time.monotonic() < deadline, f"no prompt; transcript so far:\n{self.transcript}"
            ready, _, _ = select.select([self.master], [], [], 1.0)
            if ready:
                try:
                    self.transcript += os.read(self.master, 4096).decode()
                except OSError:  # the child has gone: EIO
                    raise AssertionError(f"ami-generate ended; transcript:\n{self.transcript}") from None
        self.prompts += 1

    def say(self, line: str) -> tuple[float, str]:
        """Type a line; the answer's (score, text)."""
        start = len(self.transcript)
        os.write(self.master, line.encode() + b"\n")
        self.wait_for_prompt()
        answers = [ANSWER.match(x) for x in self.transcript[start:].replace("\r", "").split("\n")]
        answers = [m for m in answers if m]
        if not answers:
            return math.nan, ""
        (answer,) = answers
        return float(answer.group(2)) if answer.group(2) else math.nan, answer.group(3)

    def close(self) -> int:
        os.write(self.master, b"\x04")  # Ctrl-D on an empty line: end of input
        code = self.proc.wait(timeout=60)
        os.close(self.master)
        return code


def test_an_interactive_chat_keeps_the_history_the_model_was_trained_with(tmp_path: Path) -> None:
    model = make_model(tmp_path / "dialog.pt", dialog=True, max_src_len=9, persona=True)
    exported = load_exported(model)
    vocab = exported.vocab

    def scored(source: str) -> tuple[float, str]:
        """The greedy answer to a source text, by the library, with its log-probability."""
        ids = vocab.encode(source)[-9:]
        (hyps,) = decode_all(Strategy("greedy", max_len_a=1.5, max_len_b=6), exported.networks["forward"], None,
                             [ids], vocab, 1)
        return hyps[0].score, vocab.decode(hyps[0].tokens)

    term = Terminal(model, "--persona", "i like cats")
    try:
        first = term.say("what do you play?")
        assert first == pytest.approx(scored("i like cats <sep> what do you play ?"), abs=1e-4)
        assert first[1]  # an answer, which becomes a turn of the history
        second = term.say("how are you")
        # two turns of history (max_history_turns), the persona first, <sep>-joined; the model's answer is a turn
        history = [first[1], "how are you"]
        source = " <sep> ".join(["i like cats", *history])
        assert second == pytest.approx(scored(source), abs=1e-4)
        assert second != pytest.approx(scored("i like cats <sep> how are you"), abs=1e-4)  # history counts
        if len(source.split()) > 9:
            assert "more than the model was trained on (data.max_src_len = 9): kept the last 9" in term.transcript
        empty = term.say("")
        assert math.isnan(empty[0]) and empty[1] == ""
        term.say("/reset")
        assert "(conversation forgotten)" in term.transcript
        fine = term.say("fine")
        assert fine == pytest.approx(scored("i like cats <sep> fine"), abs=1e-4)
        long = " ".join(WORDS[:12])  # with the persona, more than 9 tokens: the latest 9 are kept
        history = [t for t in ("fine", fine[1], long) if t][-2:]
        assert term.say(long) == pytest.approx(scored(" <sep> ".join(["i like cats", *history])), abs=1e-4)
        assert "kept the last 9" in term.transcript
    finally:
        code = term.close()
    assert code == 0, term.transcript

