"""The anonymisation salt: where it is looked for and created."""

import pytest


def test_salt_is_found_in_a_parent_folder_or_the_user_config(tmp_path, monkeypatch):
    from medsim.data.phi import load_or_create_salt, salt_path

    if any((p / ".medsim-salt").is_file() for p in tmp_path.parents):
        pytest.skip("a .medsim-salt above the temporary folder would be found first")
    monkeypatch.delenv("MEDSIM_SALT", raising=False)
    monkeypatch.delenv("MEDSIM_SALT_FILE", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    project = tmp_path / "project"
    (project / "sub" / "dir").mkdir(parents=True)
    monkeypatch.chdir(project / "sub" / "dir")
    assert salt_path() == tmp_path / "config" / "medsim" / "salt"  # no project salt: one per user, not per cwd
    user = load_or_create_salt()
    (project / ".medsim-salt").write_bytes(b"project-salt")
    (project / ".medsim-salt").chmod(0o600)
    assert salt_path() == project / ".medsim-salt" and load_or_create_salt() == b"project-salt"
    monkeypatch.chdir(project)
    assert load_or_create_salt() == b"project-salt"
    monkeypatch.setenv("MEDSIM_SALT_FILE", str(tmp_path / "config" / "medsim" / "salt"))
    assert load_or_create_salt() == user and not (project / "sub" / "dir" / ".medsim-salt").exists()
