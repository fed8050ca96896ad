"""The teacher-licence check at the start of a distillation run.

A student trained on a teacher's outputs may be a derivative work of the teacher: UNI2-h's licence,
CC-BY-NC-ND 4.0, states this, and a closed API's terms may forbid training on its outputs. The shards record
the teacher's licence, and a run whose licence forbids derivatives or commercial use proceeds only when
the user has acknowledged it (``--accept-teacher-licence``).
"""

from __future__ import annotations

import logging
import re

from shared.errors import ConfigError

logger = logging.getLogger(__name__)

# Words and Creative Commons codes of a licence string, upper-cased with punctuation removed, that mark a
# restriction, with the restriction they mark.
_RESTRICTIVE_TOKENS = {
    "NC": "non-commercial (NC)",
    "ND": "no derivatives (ND)",
    "NONCOMMERCIAL": "non-commercial",
    "NODERIVATIVES": "no derivatives",
    "NODERIVS": "no derivatives",
    "GATED": "gated access",
}
_RESTRICTIVE_PHRASES = {
    "NON COMMERCIAL": "non-commercial",
    "NO DERIVATIVES": "no derivatives",
    "NO DERIVATIVE WORKS": "no derivatives",
    "RESEARCH ONLY": "research use only",
    "RESEARCH USE ONLY": "research use only",
}


def licence_restrictions(licence: str) -> list[str]:
    """Return the restrictions on derivatives or commercial use that ``licence`` names, in a stable order.

    "CC-BY-NC-ND-4.0" gives ["no derivatives (ND)", "non-commercial (NC)"], and "Apache-2.0" gives [].
    """
    words = re.split(r"[^A-Z0-9]+", licence.upper())
    text = " ".join(word for word in words if word)
    found = {_RESTRICTIVE_TOKENS[word] for word in words if word in _RESTRICTIVE_TOKENS}
    found |= {restriction for phrase, restriction in _RESTRICTIVE_PHRASES.items() if f" {phrase} " in f" {text} "}
    return sorted(found)


def check_teacher_licence(teacher: str, licence: str, *, accepted: bool) -> list[str]:
    """Log the teacher's licence, and raise ConfigError if it restricts derivatives or commercial use and is not accepted.

    Returns the restrictions found, so the caller can record them.
    """
    restrictions = licence_restrictions(licence)
    if not licence.strip():
        logger.warning("teacher %s: the shards record no licence. Check the teacher's terms before you use or share the student", teacher)
        return restrictions
    if not restrictions:
        logger.info("teacher %s, licence %s", teacher, licence)
        return restrictions
    if not accepted:
        raise ConfigError(
            f"teacher {teacher} is licensed under {licence!r}, which restricts {', '.join(restrictions)}. "
            "A student distilled from its embeddings may be a derivative work under those terms. "
            "Read the licence, then pass --accept-teacher-licence (accept_teacher_licence=True) to train anyway.",
            value=licence,
        )
    logger.warning(
        "teacher %s is licensed under %r, which restricts %s. Training anyway because the licence was accepted. "
        "The student's model card records the licence",
        teacher,
        licence,
        ", ".join(restrictions),
    )
    return restrictions
