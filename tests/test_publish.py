import json

from course_utils import lab, publish


def test_committed_notebooks_match_the_repository_constant(root, capsys):
    assert publish.main(["--root", str(root), "--check"]) == 0, capsys.readouterr().out


def test_one_edit_moves_every_badge_and_install_cell(root, monkeypatch):
    path = root / "notebooks" / "01_tokenisation.ipynb"
    nb = json.loads(path.read_text(encoding="utf-8"))
    monkeypatch.setattr(lab, "REPOSITORY", "someone/new-home")
    assert publish.rewrite_notebook(nb, "notebooks/01_tokenisation.ipynb")
    text = json.dumps(nb)
    assert "someone/new-home/blob/main/notebooks/01_tokenisation.ipynb" in text
    assert "https://github.com/someone/new-home" in text and "/content/new-home" in text
    assert "llm-labs/llm-labs" not in text
    assert not publish.rewrite_notebook(nb, "notebooks/01_tokenisation.ipynb")  # idempotent


def test_readme_badges_point_at_the_repository(root):
    readme = (root / "README.md").read_text(encoding="utf-8")
    for path in sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        assert publish.colab_url(f"notebooks/{path.name}") in readme, f"README has no link to {path.name}"
        assert publish.colab_url(f"notebooks/student/{path.name}") in readme, (
            f"README has no badge for the student copy of {path.name}"
        )
