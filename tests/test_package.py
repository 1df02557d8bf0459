"""The package's small public surface."""
import subprocess
import sys


def test_public_surface():
    import cacnb
    import cacnb.launch  # noqa: F401  (the submodule import must not shadow the function)

    assert callable(cacnb.launch) and cacnb.launch.__name__ == "launch"
    assert cacnb.load_config("synthetic").name == "synthetic"
    assert cacnb.build_model.__module__ == "cacnb.model"


def test_import_is_cheap():
    out = subprocess.run([sys.executable, "-c", "import cacnb, sys; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    from cacnb.paths import atomic_write

    target = tmp_path / "last.pt"
    target.write_text("good")

    def broken(tmp):
        open(tmp, "w").write("half")
        raise KeyboardInterrupt

    try:
        atomic_write(target, broken)
    except KeyboardInterrupt:
        pass
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind
