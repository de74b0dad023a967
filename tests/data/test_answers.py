"""Final answers as a grader reads them: found in a generation (nested braces whole), LaTeX and
plain forms alike, numbers by value, a reference's stated alternatives; on CHAMP's references."""

import pytest

from plot_ds.data.answers import answer_matches, extract_final_answer, normalise_answer, reference_forms


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the total is 12 apples\n#### 12", "12"),
        ("We get $\\boxed{\\frac{1}{2}}$ hmm", "\\frac{1}{2}"),
        ("so $\\boxed{\\sqrt{2}}$", "\\sqrt{2}"),
        ("the set $\\boxed{\\{1, 2\\}}$.", "\\{1, 2\\}"),
        ("first \\boxed{3}, then \\boxed{2^{n-1}}", "2^{n-1}"),
        ("Thus \\boxed{239}.", "239"),
        ("The final answer is 3/4.", "3/4."),
        ("Answer: 1,024", "1,024"),
        ("first 3 then 7 and finally 42 items", "42"),
        ("an unclosed \\boxed{7 and 8", "8"),
        ("no digits at all", None),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_normalised_forms():
    assert normalise_answer(" $3/4$. ") == "3/4"
    assert normalise_answer("\\frac{1}{2}") == normalise_answer("\\frac12") == normalise_answer("1/2") == "1/2"
    assert normalise_answer("\\sqrt{2}") == normalise_answer("\\sqrt2") == normalise_answer("sqrt(2)")
    assert normalise_answer("\\{1, 2\\}") == "{1,2}"
    assert normalise_answer("\\dfrac{n+1}{r+1}") == normalise_answer("(n+1)/(r+1)")
    assert normalise_answer("2^{n-1}") == normalise_answer("2^(n-1)")
    assert normalise_answer("\\left(-1\\right)^{n}") == "(-1)^n"  # a negative base keeps its parentheses


# LaTeX renderings a model writes for CHAMP reference answers (left) and the reference (right).
CHAMP_EQUIVALENTS = [
    ("\\boxed{\\frac{1}{3}}", "1/3"),
    ("\\boxed{-\\frac12}", "-1/2"),
    ("The answer is $-0.5$.", "-1/2"),
    ("\\boxed{0.5}", "1/2"),
    ("\\boxed{\\sqrt{3}}", "sqrt(3)"),
    ("\\boxed{2^{n-1}}", "2^(n-1)"),
    ("\\boxed{2^{997}}", "2^997"),
    ("\\boxed{\\frac{n+1}{r+1}}", "(n+1)/(r+1)"),
    ("\\boxed{\\dfrac{2^n}{n+1}}", "2^n/(n+1)"),
    ("\\boxed{\\frac{a^3+2b}{3a}}", "(a^3+2b)/(3a)"),
    ("\\boxed{\\frac{(2n)!}{2^n n!}}", "(2n)!/(2^n*n!)"),
    ("\\boxed{1 - \\frac{1}{2^{1/n}}}", "1-1/2^(1/n)"),
    ("\\boxed{\\frac{(-1)^{n+1}+n+1}{n+2}}", "((-1)^(n+1)+n+1)/(n+2) (i.e., 1 if for odd n, and n/(n+2) for even n)"),
    ("\\boxed{252}", "C(10, 5), or equivalently 252"),
    ("\\boxed{\\binom{10}{5}}", "C(10, 5), or equivalently 252"),
    ("\\boxed{2\\binom{10}{5}}", "2*C(10, 5), or equivalently 504"),
    ("\\boxed{\\frac{\\sqrt{3}}{3}}", "sqrt(3)/3, or equivalently 1/sqrt(3)"),
    ("\\boxed{\\frac{1}{\\sqrt3}}", "sqrt(3)/3, or equivalently 1/sqrt(3)"),
    ("\\boxed{\\frac{5}{14}}", "5/14, or approximately 35.7%"),
    ("\\boxed{0}", "0 (i.e., no such values)"),
    ("\\boxed{0}", "0 roots"),
    ("\\boxed{-3}", "-3 is the only possible value"),
    ("\\boxed{\\frac{1+\\sqrt{4a+1}}{2}}", "The limit exists and is equal to (1+sqrt(4a+1))/2"),
    ("\\boxed{x = \\pm 1}", "x=±1"),
    ("so $x = 2$, the answer is $x=2$", "2"),
    ("#### 1,000", "1000"),
    ("\\boxed{x+1}", "x + 1"),
]


@pytest.mark.parametrize("generated, reference", CHAMP_EQUIVALENTS)
def test_equivalent_forms_of_champ_answers_match(generated, reference):
    assert answer_matches(generated, reference)


@pytest.mark.parametrize(
    "generated, reference",
    [
        ("\\boxed{\\frac{1}{2}}", "2"),  # the old extractor's "2": a fraction is not its denominator
        ("\\boxed{0.33}", "1/3"),  # close is not equal
        ("\\boxed{1/4}", "1/3"),
        ("\\boxed{(-1)^n}", "-1^n"),
        ("\\boxed{2 \\cdot 3}", "23"),  # no digits run together when a product sign goes
        ("\\boxed{(x=1, y=2)}", "(x=1, y=2) and (x=2, y=1)"),  # half the solutions
        ("The answer is 41", "42"),
        ("I do not know", "42"),
        ("\\boxed{1}", "0 (i.e., no such values)"),
    ],
)
def test_different_answers_do_not_match(generated, reference):
    assert not answer_matches(generated, reference)


def test_every_champ_reference_is_matched_as_stated_and_boxed():
    """Each of CHAMP's 147 distinct reference answers, written back as a solution would end
    (boxed, stated, after ####), is read as itself; a neighbouring reference is not."""
    from plot_ds.assets import champ_pairs

    answers = sorted({pair["answer"] for pair in champ_pairs()})
    assert len(answers) > 100
    for answer in answers:
        for ending in (f"so $\\boxed{{{answer}}}$.", f"The final answer is {answer}", f"...\n#### {answer}"):
            assert answer_matches(ending, answer), (ending, answer)
    numeric = [a for a in answers if a.lstrip("-").isdigit()]
    for answer, other in zip(numeric, numeric[1:]):
        assert not answer_matches(f"\\boxed{{{answer}}}", other)


def test_reference_forms_split_alternatives_and_explanations():
    assert reference_forms("C(10, 5), or equivalently 252") == ["C(10, 5), or equivalently 252", "C(10, 5)", "252"]
    assert "0" in reference_forms("0 (i.e., no real-valued zeros)")
    assert reference_forms("(x=1, y=2) and (x=2, y=1)") == ["(x=1, y=2) and (x=2, y=1)"]
