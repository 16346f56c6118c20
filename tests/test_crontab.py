"""A crontab read as schedules (`opsbay schedule import`), line by line (pure)."""

from __future__ import annotations

import pytest

from opsbay_mqtt import crontab
from opsbay_mqtt.crontab import Entry


def test_entries_comments_variables_shell_and_zone() -> None:
    text = (
        "# m h dom mon dow command\r\n"
        "\r\n"
        "MAILTO=ops@example.com\r\n"
        'PATH = "/usr/local/bin:/usr/bin"\r\n'
        "30 2 * * * backup --all\r\n"
        "SHELL=/bin/bash\r\n"
        "CRON_TZ=Europe/Berlin\r\n"
        "@daily echo it's 100\\% done\r\n"
    )
    parsed = crontab.parse(text)
    assert parsed.refused == []
    assert parsed.entries == [
        Entry(5, "30 2 * * *", "UTC", "export PATH=/usr/local/bin:/usr/bin; backup --all"),
        Entry(
            8,
            "@daily",
            "Europe/Berlin",
            "export PATH=/usr/local/bin:/usr/bin; exec /bin/bash -c 'echo it'\"'\"'s 100% done'",
        ),
    ]
    assert [line for line, _ in parsed.notes] == [3, 6]


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("@reboot /usr/local/bin/start", "@reboot has no due time on the bus"),
        ("0 6 * * * mail -s hi root %body", "unescaped %"),
        ("0 5 * * * root /usr/sbin/logrotate /etc/logrotate.conf", "system crontab line"),
        ("61 * * * * true", "Bad minute"),
        ("* * * true", "five time fields and a command expected"),
        ("@often true", "unknown name"),
    ],
)
def test_lines_refused_with_their_number_and_why(line: str, says: str) -> None:
    parsed = crontab.parse(f"# first\n{line}\n")
    assert parsed.entries == []
    ((number, why),) = parsed.refused
    assert number == 2 and says in why


def test_entries_under_a_refused_zone_are_refused_too() -> None:
    parsed = crontab.parse("CRON_TZ=Bad/Zone\n0 1 * * * echo x\nCRON_TZ=UTC\n0 2 * * * echo y\n")
    assert [line for line, _ in parsed.refused] == [1, 2]
    assert "its zone, CRON_TZ on line 1, was refused" in parsed.refused[1][1]
    assert [e.line for e in parsed.entries] == [4]


@pytest.mark.parametrize("zone", ["localtime", "posixrules", "Factory", "../etc/passwd", ""])
def test_names_that_are_not_zones_are_refused(zone: str) -> None:
    from opsbay_mqtt import schedules

    with pytest.raises(ValueError, match="is not a time zone"):
        schedules.check_zone(zone)
