import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_stdlib_platform_is_not_shadowed():
    import platform

    # The standard library's module, with its real API, not a package from platform/.
    assert callable(platform.machine) and callable(platform.python_version)
    assert "site-packages" not in platform.__file__
    assert not (REPO / "platform" / "__init__.py").exists()


def test_frugalray_is_importable_from_the_src_layout():
    spec = importlib.util.find_spec("frugalray")
    assert spec is not None
    assert Path(spec.origin).resolve().parent == (REPO / "platform" / "frugalray").resolve()
