"""The session-end guard (tests/conftest.py) fails a test session that leaves files in the repository:
`git status` after the suite stays as it was (empty on a fresh clone). Checked on a scratch git
repository, with a session whose one test writes a file into it."""

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def session(repo: Path, test_body: str, tmp_path: Path) -> subprocess.CompletedProcess:
    test = tmp_path / "session" / "test_scratch.py"
    test.parent.mkdir(parents=True, exist_ok=True)
    test.write_text(f"from pathlib import Path\n\n\ndef test_it():\n    {test_body}\n")
    env = dict(os.environ, SFTKIT_TREE_GUARD_REPO=str(repo), PYTHONPATH=str(TESTS))
    env.pop("SFTKIT_SCREENSHOTS", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                           "--rootdir", str(test.parent), str(test)], cwd=test.parent, env=env, capture_output=True,
                          text=True, timeout=120)


def scratch_repo(path: Path) -> Path:
    path.mkdir()
    for cmd in (["init", "-q"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "0"]):
        subprocess.run(["git", *cmd], cwd=path, check=True, capture_output=True)
    return path


def test_a_session_that_leaves_a_file_in_the_repository_fails_naming_it(tmp_path):
    repo = scratch_repo(tmp_path / "repo")
    out = session(repo, f"(Path({str(repo)!r}) / 'notebooks' / 'runs').mkdir(parents=True); "
                        f"(Path({str(repo)!r}) / 'notebooks' / 'runs' / 'x.json').write_text('1')", tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "1 passed" in out.stdout and "tests left files in the repository" in out.stdout, out.stdout
    assert "notebooks/runs/x.json" in out.stdout


def test_a_session_that_writes_only_to_tmp_passes(tmp_path):
    repo = scratch_repo(tmp_path / "repo")
    out = session(repo, f"(Path({str(tmp_path)!r}) / 'elsewhere.txt').write_text('1')", tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "left files" not in out.stdout
