"""Final answers of math solutions: found in a generation, written in one canonical form, compared
as a grader would (LaTeX and plain forms alike; numbers by value; a reference's stated
alternatives, "252" for "C(10, 5), or equivalently 252")."""

from __future__ import annotations

import math
import re
from fractions import Fraction

BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
HASHES = re.compile(r"####\s*([^\n]+)")
STATED = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*([^\n]+)", re.IGNORECASE)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def braced(text: str, start: int) -> str | None:
    """The text inside the brace group opening at ``text[start]``, nested groups whole; escaped
    braces (``\\{``) are text. None when the group is never closed."""
    depth, index = 0, start
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : index]
        index += 1
    return None


def extract_final_answer(text: str) -> str | None:
    """The final answer a solution states: the last "#### x", else the last "\\boxed{x}" (nested
    braces whole), else the last "answer is x", else the last number in the text."""
    for pattern in (HASHES, None, STATED):
        if pattern is None:
            boxes = [braced(text, match.end() - 1) for match in BOXED.finditer(text)]
            found = [box for box in boxes if box is not None]
        else:
            found = pattern.findall(text)
        if found:
            return found[-1]
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


LATEX_WORDS = {
    r"\pm": "±",
    r"\mp": "∓",
    r"\cdot": "*",
    r"\times": "*",
    r"\geq": "≥",
    r"\ge": "≥",
    r"\leq": "≤",
    r"\le": "≤",
    r"\neq": "≠",
    r"\infty": "inf",
    r"\ldots": "...",
    r"\cdots": "...",
    r"\dots": "...",
    r"\{": "{",
    r"\}": "}",
    r"\%": "%",
}
DROPPED = (r"\left", r"\right", r"\displaystyle", r"\,", r"\;", r"\!", r"\ ", "$")
# \frac{a}{b}, \frac12, \frac1{b}, \frac{a}2: each argument a brace group or one character.
ARGUMENT = r"(\{(?:[^{}]|\{[^{}]*\})*\}|[0-9a-zA-Z])"
# A number, a name or a call such as sqrt(3): parentheses around one of these change nothing,
# unless a name or a call stands before them (f(x)) or it is negative ((-1)^n).
ATOM_IN_PARENS = re.compile(r"(?<![\w)])\((\d+(?:\.\d+)?|[a-z]+\d*|[a-z]+\([^()]*\))\)")


def strip_group(argument: str) -> str:
    return argument[1:-1] if argument.startswith("{") and argument.endswith("}") else argument


def top_level_operator(text: str, operators: str) -> bool:
    """Whether one of ``operators`` stands in ``text`` outside every bracket (a leading sign aside)."""
    depth = 0
    for index, char in enumerate(text):
        depth += (char in "({[") - (char in ")}]")
        if depth == 0 and index > 0 and char in operators:
            return True
    return False


# A denominator that needs no parentheses: a number, a name or a call, maybe raised to a power.
BARE_DENOMINATOR = re.compile(r"(?:\d+|[a-zA-Z]|[a-z]+\([^()]*\))(?:\^(?:\w|\([^()]*\)|\{[^{}]*\}))?")


def fraction(numerator: str, denominator: str) -> str:
    """\\frac{a}{b} in plain notation, with the parentheses its operands need: (a+1)/b, 1/(3a)."""
    top, bottom = strip_group(numerator), strip_group(denominator)
    top = f"({top})" if top_level_operator(top, "+-/") else top
    bottom = bottom if BARE_DENOMINATOR.fullmatch(bottom.strip()) else f"({bottom})"
    return f"{top}/{bottom}"


def from_latex(answer: str) -> str:
    """LaTeX to the plain notation CHAMP's references use: \\frac{a+1}{b} -> (a+1)/b,
    \\binom{n}{k} -> C(n, k),
    \\sqrt{x} -> sqrt(x), x^{n} -> x^(n), \\text{...} -> its words."""
    for token in DROPPED:
        answer = answer.replace(token, "")
    answer = re.sub(r"\\[dt]frac", r"\\frac", answer)
    answer = re.sub(r"\\(?:text|mathrm|mathbf|textbf|operatorname)\s*\{([^{}]*)\}", r"\1", answer)
    answer = re.sub(r"\\boxed\s*\{(.*)\}", r"\1", answer)
    for _ in range(4):  # nested fractions and roots, innermost first
        answer = re.sub(r"\\frac\s*" + ARGUMENT + r"\s*" + ARGUMENT, lambda m: fraction(m[1], m[2]), answer)
        answer = re.sub(
            r"\\binom\s*" + ARGUMENT + r"\s*" + ARGUMENT,
            lambda m: f"C({strip_group(m[1])}, {strip_group(m[2])})",
            answer,
        )
        answer = re.sub(r"\\sqrt\s*" + ARGUMENT, lambda m: f"sqrt({strip_group(m[1])})", answer)
        answer = re.sub(r"([\^_])\{([^{}]*)\}", r"\1(\2)", answer)
    for word, plain in LATEX_WORDS.items():
        answer = answer.replace(word, plain)
    return answer


def normalise_answer(answer: str) -> str:
    """One canonical spelling: plain notation, no spaces, no thousands separators, lower case,
    no parentheses around a single number or name, no final full stop."""
    answer = from_latex(answer).strip().rstrip(".").strip()
    answer = re.sub(r"(?<=\d),(?=\d{3}\b)", "", answer)  # 1,000 -> 1000
    answer = re.sub(r"\s+", "", answer).lower()
    answer = re.sub(r"(?<!\d)\*|\*(?!\d)", "", answer)  # 2*C(10,5) as 2C(10,5); 2*3 stays
    previous = None
    while previous != answer:
        previous, answer = answer, ATOM_IN_PARENS.sub(r"\1", answer)
    return answer


def numeric_value(answer: str) -> float | None:
    """The value of a plain number, decimal, percentage or fraction of integers; else None."""
    match = re.fullmatch(r"(-?)(\d+(?:\.\d+)?)(?:/(\d+(?:\.\d+)?))?(%?)", answer)
    if not match or match[3] in ("0", "0.0"):
        return None
    value = Fraction(match[2]) / (Fraction(match[3]) if match[3] else 1) / (100 if match[4] else 1)
    return float(-value if match[1] else value)


def without_explanation(form: str) -> str | None:
    """``form`` without a trailing explanation in parentheses ("0 (i.e., no such values)")."""
    if not form.endswith(")"):
        return None
    depth = 0
    for index in range(len(form) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(form[index], 0)
        if depth == 0:
            head = form[:index]
            explains = re.match(r"\((?:i\.e\.|[a-z]+\s)", form[index:])
            return head.strip() if explains and head[-1:].isspace() else None
    return None


# How CHAMP's references word a value in prose: "The limit exists and is equal to 2",
# "3 is the only possible value", "0 roots".
PROSE_VALUE = (
    re.compile(r"the\s.*?\b(?:is equal to|is)\s+(.+)", re.IGNORECASE),
    re.compile(r"(.+?)\s+is the only possible value", re.IGNORECASE),
    re.compile(r"(-?\d+|[a-z])\s+[a-z]+"),
)


def reference_forms(reference: str) -> list[str]:
    """A reference's acceptable forms: itself, its stated alternatives ("..., or equivalently
    ..."), each without its explanation in parentheses, and the value its prose states."""
    forms = [reference]
    for part in re.split(r",?\s+or\s+(?:equivalently|approximately|an equivalent form such as)\s+", reference):
        bare = without_explanation(part)
        for form in (part, bare):
            if form:
                forms.append(form)
                forms += [match[1] for pattern in PROSE_VALUE if (match := pattern.fullmatch(form))]
    return list(dict.fromkeys(forms))


def same_answer(extracted: str, reference: str) -> bool:
    mine, theirs = normalise_answer(extracted), normalise_answer(reference)
    if mine == theirs:
        return True
    # "x=2" for the reference "2": a single named value stands for the value.
    assignment = re.fullmatch(r"[a-z]=([^=,]+)", mine)
    if assignment and "=" not in theirs and assignment[1] == theirs:
        return True
    a, b = numeric_value(mine), numeric_value(theirs)
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)


def answer_matches(generated: str, reference: str) -> bool:
    """Whether a generation's final answer is one a grader would accept for ``reference``."""
    extracted = extract_final_answer(generated)
    return extracted is not None and any(same_answer(extracted, form) for form in reference_forms(reference))
