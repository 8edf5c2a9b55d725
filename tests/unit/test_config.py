"""Settings from the environment: what each variable sets, and what nats.connect gets."""

import pytest

from kapellmeister.config import Settings


def test_defaults_from_an_empty_environment():
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.nats_url == "nats://127.0.0.1:4222"
    assert (settings.user, settings.password, settings.token, settings.creds_file) == (
        None,
        None,
        None,
        None,
    )
    assert (settings.replicas, settings.concurrency, settings.max_deliver) == (1, 64, 5)
    assert (settings.ack_wait_s, settings.sweep_interval_s) == (30.0, 30.0)
    assert (settings.definitions, settings.data_dir, settings.log_level) == (
        "",
        ".kapellmeister",
        "INFO",
    )
    assert settings.connect_options() == {"servers": ["nats://127.0.0.1:4222"]}


def test_from_env_reads_os_environ_by_default(monkeypatch):
    for name in [
        "NATS_URL",
        "NATS_USER",
        "NATS_PASSWORD",
        "NATS_TOKEN",
        "NATS_CREDS",
        "NATS_NKEY",
        "NATS_CA",
        "NATS_CERT",
        "NATS_KEY",
    ]:
        monkeypatch.delenv(name, raising=False)
    for field in Settings.__struct_fields__:
        monkeypatch.delenv(f"KAPELLMEISTER_{field.upper()}", raising=False)
    monkeypatch.setenv("NATS_URL", "nats://from-env:4222")
    monkeypatch.setenv("KAPELLMEISTER_CONCURRENCY", "3")
    settings = Settings.from_env()
    assert settings.nats_url == "nats://from-env:4222"
    assert settings.concurrency == 3


def test_nats_url_and_typed_knobs():
    settings = Settings.from_env(
        {
            "NATS_URL": "nats://nats.example:4222",
            "KAPELLMEISTER_CONCURRENCY": "8",
            "KAPELLMEISTER_REPLICAS": "3",
            "KAPELLMEISTER_ACK_WAIT_S": "2.5",
            "KAPELLMEISTER_MAX_DELIVER": "7",
            "KAPELLMEISTER_SWEEP_INTERVAL_S": "10",
            "KAPELLMEISTER_DEFINITIONS": "/a:/b",
            "KAPELLMEISTER_DATA_DIR": "/var/lib/k",
            "KAPELLMEISTER_LOG_LEVEL": "DEBUG",
            "UNRELATED": "x",
        }
    )
    assert settings.nats_url == "nats://nats.example:4222"
    assert settings.concurrency == 8
    assert isinstance(settings.concurrency, int)
    assert settings.replicas == 3
    assert settings.ack_wait_s == 2.5
    assert settings.max_deliver == 7
    assert settings.sweep_interval_s == 10.0
    assert settings.definitions == "/a:/b"
    assert settings.data_dir == "/var/lib/k"
    assert settings.log_level == "DEBUG"


def test_several_servers():
    settings = Settings.from_env({"NATS_URL": "nats://a:4222, nats://b:4222,nats://c:4222"})
    assert settings.connect_options()["servers"] == [
        "nats://a:4222",
        "nats://b:4222",
        "nats://c:4222",
    ]


def test_user_and_password():
    settings = Settings.from_env({"NATS_USER": "ann", "NATS_PASSWORD": "s3cret"})
    assert (settings.user, settings.password) == ("ann", "s3cret")
    assert settings.connect_options() == {
        "servers": ["nats://127.0.0.1:4222"],
        "user": "ann",
        "password": "s3cret",
    }


def test_user_without_password_sends_an_empty_one():
    options = Settings.from_env({"NATS_USER": "ann"}).connect_options()
    assert (options["user"], options["password"]) == ("ann", "")


def test_password_without_user_is_not_sent():
    options = Settings.from_env({"NATS_PASSWORD": "s3cret"}).connect_options()
    assert "user" not in options
    assert "password" not in options


def test_token():
    settings = Settings.from_env({"NATS_TOKEN": "t0k3n"})
    assert settings.connect_options() == {"servers": ["nats://127.0.0.1:4222"], "token": "t0k3n"}


def test_creds_file():
    settings = Settings.from_env({"NATS_CREDS": "/etc/nats/app.creds"})
    assert settings.creds_file == "/etc/nats/app.creds"
    assert settings.connect_options() == {
        "servers": ["nats://127.0.0.1:4222"],
        "user_credentials": "/etc/nats/app.creds",
    }


def test_nkey_seed_file():
    settings = Settings.from_env({"NATS_NKEY": "/etc/nats/app.nk"})
    assert settings.connect_options()["nkeys_seed"] == "/etc/nats/app.nk"


def test_an_inbox_prefix_of_its_own():
    assert "inbox_prefix" not in Settings.from_env({}).connect_options()  # nats-py's _INBOX
    for env in (
        {"NATS_INBOX_PREFIX": "_INBOX_weather"},
        {"KAPELLMEISTER_INBOX_PREFIX": "_INBOX_weather"},
    ):
        assert Settings.from_env(env).connect_options()["inbox_prefix"] == "_INBOX_weather"


def test_our_prefix_wins_over_the_short_names():
    settings = Settings.from_env({"NATS_USER": "short", "KAPELLMEISTER_USER": "long"})
    assert settings.user == "long"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KAPELLMEISTER_CONCURRENCY", "eight"),
        ("KAPELLMEISTER_REPLICAS", "3.5"),
        ("KAPELLMEISTER_ACK_WAIT_S", "soon"),
        ("KAPELLMEISTER_MAX_DELIVER", ""),
    ],
)
def test_a_bad_number_raises_value_error_naming_the_setting(name, value):
    with pytest.raises(ValueError) as info:
        Settings.from_env({name: value})
    field = name.removeprefix("KAPELLMEISTER_").lower()
    assert f"`$.{field}`" in str(info.value)


def test_a_bad_int_names_the_environment_variable():
    with pytest.raises(ValueError) as info:
        Settings.from_env({"KAPELLMEISTER_CONCURRENCY": "eight"})
    assert "KAPELLMEISTER_CONCURRENCY" in str(info.value)
