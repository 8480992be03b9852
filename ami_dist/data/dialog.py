"""PersonaChat dialogs (ParlAI fbdialog text) turned into (history, response) pairs, and the paper's tokenisation.

Format: each line is ``<n> <text>``; ``n`` counts from 1 within an episode and a line numbered 1 starts a
new one. ``your persona: ...`` lines carry the speaker's persona; other lines are
``partner message<TAB>response`` (further TAB fields, such as candidate lists, are ignored).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ami_dist.data.textio import read_lines
from ami_dist.errors import DataError

PERSONA_PREFIX = "your persona:"
PARTNER_PERSONA_PREFIX = "partner's persona:"
TURN_SEPARATOR = "<sep>"

# Pan et al. (2020), appendix B: dialog text is "tokenised by splitting on spaces and punctuation".
# A token is the turn separator, a run of word characters (apostrophes inside words kept: "don't",
# "i'm") or one other non-space character. Tokenising tokenised text changes nothing.
_TOKEN = re.compile(r"<sep>|\w+(?:'\w+)*|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Split on whitespace and punctuation; every punctuation mark is its own token."""
    return _TOKEN.findall(text)


@dataclass
class Episode:
    persona: list[str] = field(default_factory=list)
    turns: list[tuple[str, str]] = field(default_factory=list)  # (partner message, response)
    first_line: int = 0


def read_personachat(path: str | Path, max_chars: int | None = None) -> list[Episode]:
    """Parse a fbdialog file; a line that does not fit the format is a DataError naming file and line.

    Blank lines are skipped (they carry nothing in fbdialog text); a line longer than ``max_chars`` is an error.
    """
    episodes: list[Episode] = []
    expected = 1
    for number, line in enumerate(read_lines(path, allow_empty_lines=True, max_chars=max_chars), start=1):
        if not line.strip():
            continue
        head, _, text = line.partition(" ")
        if not head.isdigit():
            raise DataError(f"{path}:{number}: expected '<turn number> <text>', got {line[:40]!r}")
        n = int(head)
        if n == 1:
            episodes.append(Episode(first_line=number))
        elif not episodes or n != expected:
            raise DataError(
                f"{path}:{number}: turn number {n} breaks the numbering (expected {expected} or 1 to start "
                "a new dialog)"
            )
        expected = n + 1
        episode = episodes[-1]
        if text.startswith(PERSONA_PREFIX) or text.startswith(PARTNER_PERSONA_PREFIX):
            if episode.turns:
                raise DataError(f"{path}:{number}: persona line after the dialog turns began")
            if text.startswith(PERSONA_PREFIX):
                episode.persona.append(text[len(PERSONA_PREFIX):].strip())
            continue
        fields = text.split("\t")
        if len(fields) < 2 or not fields[1].strip():
            raise DataError(f"{path}:{number}: expected 'partner message<TAB>response', found no response")
        episode.turns.append((fields[0].strip(), fields[1].strip()))
    if not episodes:
        raise DataError(f"{path}: no dialogs found")
    for episode in episodes:
        if not episode.turns:
            raise DataError(f"{path}:{episode.first_line}: dialog has persona lines but no turns")
    return episodes


def dialog_pairs(
    episodes: list[Episode], max_history_turns: int = 3, include_persona: bool = False
) -> list[tuple[str, str]]:
    """(source, response) pairs: the source is the last ``max_history_turns`` utterances, tokenised.

    Utterances are joined with ``<sep>``; with ``include_persona`` the persona lines come first.
    Texts come back as space-joined tokens, the form both the vocabulary and BLEU see.
    """
    pairs = []
    for episode in episodes:
        history: list[str] = []
        persona = " ".join(" ".join(tokenize(p)) for p in episode.persona)
        for partner, response in episode.turns:
            if partner and partner != "__SILENCE__":
                history.append(" ".join(tokenize(partner)))
            context = history[-max_history_turns:]
            if include_persona and persona:
                context = [persona, *context]
            source = f" {TURN_SEPARATOR} ".join(context)
            target = " ".join(tokenize(response))
            if source and target:
                pairs.append((source, target))
            history.append(target)
    return pairs
