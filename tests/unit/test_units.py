import pytest

from replication.errors import UsageError
from replication.units import check_name, fmt_size, parse_pow2, parse_size


@pytest.mark.parametrize("text,n", [("512", 512), ("4K", 4096), ("64k", 65536), ("1M", 1 << 20),
                                    ("2G", 2 << 30), ("1T", 1 << 40), ("8KiB", 8192)])
def test_sizes(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "0", "-1", "1.5M", "4X", "K", "1 M B", "99999999999T"])
def test_bad_sizes(text):
    with pytest.raises(UsageError):
        parse_size(text)


def test_pow2():
    assert parse_pow2("64K", "region size", 4096, 1 << 26) == 65536
    with pytest.raises(UsageError, match="power of two"):
        parse_pow2("48K", "region size", 4096, 1 << 26)
    with pytest.raises(UsageError, match="between"):
        parse_pow2("1K", "region size", 4096, 1 << 26)


@pytest.mark.parametrize("name", ["a", "snap-1", "x.y_z", "A" * 64])
def test_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "a/b", "..", ".", "a b", "A" * 65, "é", "a\n"])
def test_bad_names(name):
    with pytest.raises(UsageError):
        check_name(name)


def test_fmt():
    assert fmt_size(65536) == "64K" and fmt_size(1 << 30) == "1G" and fmt_size(1000) == "1000"
