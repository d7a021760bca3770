"""Trust: the anonymisation salt is a secret (issue 9, part 4). A salt file others can read or that another user
owns is refused like ssh refuses such a key; an empty salt is one clear line and exit 2."""

from __future__ import annotations

import os

import pytest

from medsim.cli import main


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.fixture()
def salt_file(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDSIM_SALT", raising=False)
    p = tmp_path / "salt"
    p.write_bytes(b"0123456789abcdef" * 4)
    p.chmod(0o600)
    monkeypatch.setenv("MEDSIM_SALT_FILE", str(p))
    return p


def split(sample_root, tmp_path, capsys):
    return run(["data", "split", str(sample_root / "derm"), "--out", str(tmp_path / "s.json"), "--no-decode"],
               capsys)


def test_a_private_salt_file_is_used(salt_file, sample_root, tmp_path, capsys):
    code, _, err = split(sample_root, tmp_path, capsys)
    assert code == 0, err
    from medsim.data.phi import Anonymizer, load_or_create_salt

    assert load_or_create_salt() == salt_file.read_bytes()
    assert Anonymizer(load_or_create_salt())("PAT-1", "p") != Anonymizer(b"other")("PAT-1", "p")


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o666])
def test_a_salt_file_others_can_access_is_refused(salt_file, sample_root, tmp_path, capsys, mode):
    salt_file.chmod(mode)
    code, _, err = split(sample_root, tmp_path, capsys)
    assert code == 2 and str(salt_file) in err and f"chmod 600 '{salt_file}'" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "s.json").exists()


@pytest.mark.skipif(os.name != "posix" or os.getuid() != 0, reason="chown to another user needs root")
def test_a_salt_file_of_another_user_is_refused(salt_file, sample_root, tmp_path, capsys):
    os.chown(salt_file, 12345, -1)
    code, _, err = split(sample_root, tmp_path, capsys)
    assert code == 2 and "belongs to another user" in err and str(salt_file) in err, err


def test_an_empty_salt_exits_2_in_one_line(salt_file, sample_root, tmp_path, capsys, monkeypatch):
    salt_file.write_bytes(b"  \n")
    code, _, err = split(sample_root, tmp_path, capsys)
    assert code == 2 and "salt file is empty" in err and len(err.strip().splitlines()) == 1, err
    monkeypatch.setenv("MEDSIM_SALT", "")
    code, _, err = split(sample_root, tmp_path, capsys)
    assert code == 2 and "MEDSIM_SALT is set but empty" in err and "internal error" not in err, err


def test_a_new_salt_file_is_private(tmp_path, monkeypatch):
    from medsim.data.phi import load_or_create_salt

    monkeypatch.delenv("MEDSIM_SALT", raising=False)
    monkeypatch.setattr(os, "umask", os.umask)
    old = os.umask(0o000)  # even a permissive umask gives a 0600 salt
    try:
        salt = load_or_create_salt(tmp_path / "cfg" / "salt")
    finally:
        os.umask(old)
    assert len(salt) == 64 and (tmp_path / "cfg" / "salt").stat().st_mode & 0o777 == 0o600
    assert load_or_create_salt(tmp_path / "cfg" / "salt") == salt
