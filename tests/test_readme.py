import re

from conftest import REPO


def readme_commands():
    blocks = re.findall(r"```bash\n(.+?)\n\s*```", (REPO / "README.md").read_text(), flags=re.S)
    return [block.strip() for block in blocks]


def test_quickstart_is_two_commands_and_ci_runs_the_test_command():
    commands = readme_commands()
    install_and_train, install_and_test = commands[0], commands[1]
    assert install_and_train.count("\n") == 0 and install_and_test.count("\n") == 0
    assert "torch==2.13.0" in install_and_train and install_and_train.endswith("plot-train")
    assert install_and_test.endswith("python -m pytest tests -n 2 --dist loadfile")
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert install_and_test in ci_lines
