"""Manifest hygiene: secret values never leave the process."""

from raymem.outputs import REDACTED, redacted


def test_env_vars_keep_only_their_names_and_secret_looking_keys_their_presence():
    config = {
        "name": "nightly",
        "ray": {"runtime_env": {"env_vars": {"HF_TOKEN": "hf_abc", "PLAIN": "1"}, "working_dir": "/app"}},
        "storage": {"aws_access_key_id": "AKIA", "Password": "p", "api_key": "k", "token": None, "tokens": []},
        "list": [{"client_secret": "s"}],
    }
    out = redacted(config)
    assert out["ray"]["runtime_env"] == {"env_vars": {"HF_TOKEN": REDACTED, "PLAIN": REDACTED}, "working_dir": "/app"}
    assert out["storage"] == {
        "aws_access_key_id": REDACTED,
        "Password": REDACTED,
        "api_key": REDACTED,
        "token": None,  # unset stays visibly unset
        "tokens": [],
    }
    assert out["list"] == [{"client_secret": REDACTED}] and out["name"] == "nightly"
    assert config["storage"]["api_key"] == "k"  # the input is not modified
