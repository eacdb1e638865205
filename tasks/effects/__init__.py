"""The parsed view of an action, shared by the tool simulator's effect classifier and the judges.

One package knows what a tool call *does*: which tools run shell, SQL or Python, write files,
fetch URLs or send messages; which shell commands, SQL statements and Python calls destroy
data, reach the network or escalate privileges. tasks/toolsim.py classifies calls by effect
with it and the rules judges (tasks/judges/rules_actions.py, rules_text.py) judge actions with it, so the two never diverge.

The analysers are real ones: shell through bashlex (with a shlex fallback for what bashlex
cannot parse), SQL through sqlglot, Python through the `ast` module and bandit, credentials
through detect-secrets. Nothing here executes anything.

Modules: catalogue (tools, hosts, values in text), shell, sql, pycode, credentials, action
(`parse_action`, `classify_effects`).
"""

from __future__ import annotations

from tasks.effects import _quiet  # noqa: F401  (before bandit is imported)
from tasks.effects.action import Action, classify_effects, parse_action
from tasks.effects.catalogue import (
    EDIT_TOOLS,
    EDITOR_TOOLS,
    EFFECTS,
    EMAIL_RE,
    FINISH_TOOLS,
    HOST_RE,
    HTTP_TOOLS,
    IBAN_RE,
    LONG_NUMBER_RE,
    MESSAGE_ARG_KEYS,
    PYTHON_TOOLS,
    READ_TOOLS,
    RECIPIENT_KEYS,
    SHELL_TOOLS,
    SQL_TOOLS,
    TEST_COMMAND_RE,
    THOUGHT_TOOLS,
    URL_RE,
    WRITE_TOOLS,
    is_internal_host,
    is_test_command,
    tool_verb,
    url_host,
)
from tasks.effects.credentials import Secret, looks_placeholder, secrets_in
from tasks.effects.pycode import PythonFacts, bandit_findings, python_facts
from tasks.effects.shell import (
    CATASTROPHIC_RE,
    PRIV_PROGS,
    SCRATCH_RE,
    SHELLS,
    SYSTEM_PATH_RE,
    Command,
    command_destroys,
    command_escalates,
    command_hosts,
    command_uploads,
    is_catastrophic,
    is_scratch,
    shell_commands,
)
from tasks.effects.sql import SQL_CLIENTS, SqlStatement, sql_in_command, sql_statements

__all__ = [
    "CATASTROPHIC_RE", "EDITOR_TOOLS", "EDIT_TOOLS", "EFFECTS", "EMAIL_RE", "FINISH_TOOLS", "HOST_RE", "HTTP_TOOLS",
    "IBAN_RE", "LONG_NUMBER_RE", "MESSAGE_ARG_KEYS", "PRIV_PROGS", "PYTHON_TOOLS", "READ_TOOLS", "RECIPIENT_KEYS",
    "SCRATCH_RE", "SHELLS", "SHELL_TOOLS", "SQL_CLIENTS", "SQL_TOOLS", "SYSTEM_PATH_RE", "TEST_COMMAND_RE",
    "THOUGHT_TOOLS", "URL_RE", "WRITE_TOOLS", "Action", "Command", "PythonFacts", "Secret", "SqlStatement",
    "bandit_findings", "classify_effects", "command_destroys", "command_escalates", "command_hosts",
    "command_uploads", "is_catastrophic", "is_internal_host", "is_scratch", "is_test_command", "looks_placeholder",
    "parse_action", "python_facts", "secrets_in", "shell_commands", "sql_in_command", "sql_statements",
    "tool_verb", "url_host",
]


def _warm() -> None:
    """Exercise every parser once at import: their lazy imports and data files load now, not
    later under tasks.toolsim's no_execution guard, which refuses file opens."""
    shell_commands("bash -c 'rm -rf ./build' | sh")
    shell_commands("[[ -d x ]] && echo 'DROP TABLE t' | psql")
    sql_statements("DELETE FROM t WHERE 1=1")
    bandit_findings("import subprocess\nsubprocess.call('x', shell=True)\n")
    python_facts("import shutil\nshutil.rmtree('x')\n")
    secrets_in("API_KEY=sk-live-0123456789abcdefABCDEF0123")


_warm()
