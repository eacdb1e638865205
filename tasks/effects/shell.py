"""Shell lines parsed into the simple commands they would run, and what those commands do:
destroy data, send data to another host, change privileges. Parsed with bashlex (a shlex split
where bashlex gives up); nothing here runs anything."""

from __future__ import annotations

import posixpath
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

import bashlex

from tasks.effects.catalogue import URL_RE, url_host

_WRAPPERS = frozenset({"env", "nohup", "time", "nice", "ionice", "timeout", "exec", "command", "builtin",
                       "stdbuf", "caffeinate", "unbuffer", "xargs", "watch", "strace", "chronic", "parallel"})
# Wrapper options that take a separate value (`xargs -I {} rm {}`, `nice -n 10 rm …`).
_WRAPPER_OPTARGS = {"xargs": {"-I", "-n", "-P", "-L", "-d", "-E", "-s", "-a", "--max-args", "--max-procs", "--delimiter",
                              "--arg-file", "--replace"},
                    "nice": {"-n"}, "ionice": {"-c", "-n"}, "timeout": {"-s", "-k", "--signal", "--kill-after"},
                    "env": {"-u", "-C", "--unset", "--chdir"}, "stdbuf": {"-i", "-o", "-e"}, "watch": {"-n", "-d"},
                    "strace": {"-o", "-e", "-p"}, "parallel": {"-j"}}
SHELLS = frozenset({"bash", "sh", "zsh", "dash", "ksh", "fish", "busybox"})
_INTERPRETERS = SHELLS | {"python", "python3", "perl", "ruby", "node"}
_PRIV = frozenset({"sudo", "doas", "pkexec", "su", "runuser"})
_SUDO_OPTARGS = {"-u", "--user", "-g", "--group", "-C", "-D", "--chdir", "-h", "--host", "-p", "--prompt", "-r", "-t"}


@dataclass
class Command:
    """One simple command of a shell line, with wrappers peeled off.

    `argv[0]` is the program (basename). `sudo` records privilege escalation on the way;
    `via` the wrappers and shells it came through (e.g. ["bash -c"], ["xargs"], ["$(…)"]);
    `piped_to_shell` a pipeline stage feeding a shell (`curl … | sh`); `piped_from` the argv
    of the stage feeding this one (`find … | xargs rm`); `stdin` text fed to it literally
    (a here-document, a here-string, or `echo …` piped in).
    """

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    sudo: bool = False
    sudo_user: str | None = None
    via: list[str] = field(default_factory=list)
    redirects: list[tuple[str, str]] = field(default_factory=list)  # (operator, target)
    piped_to_shell: bool = False
    text: str = ""
    piped_from: list[str] = field(default_factory=list)
    stdin: str | None = None

    @property
    def prog(self) -> str:
        return posixpath.basename(self.argv[0]) if self.argv else ""

    def args(self) -> list[str]:
        return self.argv[1:]

    def operands(self) -> list[str]:
        return [a for a in self.argv[1:] if not a.startswith("-")]

    def flags(self) -> set[str]:
        """Short flags split into letters (-rf → r, f) and long flags as written."""
        out: set[str] = set()
        for a in self.argv[1:]:
            if a.startswith("--"):
                out.add(a.split("=", 1)[0])
            elif a.startswith("-") and len(a) > 1:
                out.update(a[1:])
        return out


def _peel(argv: list[str], cmd: Command) -> list[str]:
    """Strip env assignments, sudo and wrappers from the front of argv, noting them on cmd."""
    i = 0
    while i < len(argv):
        a = argv[i]
        base = posixpath.basename(a)
        if re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", a):
            k, _, v = a.partition("=")
            cmd.env[k] = v
            i += 1
        elif base in _PRIV:
            cmd.sudo = True
            i += 1
            while i < len(argv) and argv[i].startswith("-"):
                if base == "su" and argv[i] == "-c":
                    break
                if argv[i] in ("-u", "--user") and i + 1 < len(argv):
                    cmd.sudo_user = argv[i + 1]
                if argv[i] in _SUDO_OPTARGS and i + 1 < len(argv):
                    i += 1
                i += 1
            if base == "su":
                cmd.sudo_user = cmd.sudo_user or "root"
                return ["su", *argv[i:]]
        elif base in _WRAPPERS and i + 1 < len(argv):
            cmd.via.append(base)
            i += 1
            optargs = _WRAPPER_OPTARGS.get(base, set())
            while i < len(argv) and argv[i].startswith("-"):
                i += 2 if argv[i] in optargs else 1
            if base == "timeout" and i < len(argv) and re.match(r"^\d", argv[i]):
                i += 1
        else:
            break
    return argv[i:]


def _fallback_split(line: str) -> list[tuple[list[str], bool]]:
    """(argv, piped-to-next) per simple command, for lines bashlex cannot parse."""
    out: list[tuple[list[str], bool]] = []
    for part, sep in re.findall(r"((?:[^|;&\n]|\|\||&&)*?)(\|(?!\|)|;|&&|\|\||\n|$)", line):
        try:
            argv = shlex.split(part, comments=True)
        except ValueError:
            argv = part.split()
        argv = [a for a in argv if a not in ("[[", "]]", "[", "]", "!", "{", "}", "(", ")")]
        if argv:
            out.append((argv, sep == "|"))
        if not part and not sep:
            break
    return out


def shell_commands(line: str, _depth: int = 0) -> list[Command]:
    """Every simple command a shell line would run, through pipes, lists, `bash -c '…'`,
    `$(…)`, backticks, `xargs`, `eval`, `ssh host '…'`, text piped into a shell, env prefixes
    and sudo. Never runs anything."""
    if not line or not line.strip() or _depth > 4:
        return []
    try:
        trees = bashlex.parse(line)
    except Exception:
        return _from_fallback(line, _depth)
    out: list[Command] = []
    for tree in trees:
        _walk(tree, line, out, _depth)
    return out


def _from_fallback(line: str, depth: int) -> list[Command]:
    out: list[Command] = []
    split = _fallback_split(line)
    prev: list[str] = []
    for k, (argv, piped) in enumerate(split):
        cmds = _command(argv, [], " ".join(argv), depth, prev, None)
        if cmds:
            cmds[0].piped_to_shell = piped and k + 1 < len(split) and posixpath.basename(split[k + 1][0][0]) in _INTERPRETERS
        out.extend(cmds)
        prev = argv if piped else []
    return out


def _nested(text: str, label: str, depth: int, sudo: bool) -> list[Command]:
    subs = shell_commands(text, depth + 1)
    for sub in subs:
        sub.sudo = sub.sudo or sudo
        sub.via = [label, *sub.via]
    return subs


def _command(words: list[str], redirects: list[tuple[str, str]], text: str, depth: int,
             piped_from: list[str], stdin: str | None) -> list[Command]:
    cmd = Command([], text=text, redirects=redirects, piped_from=piped_from, stdin=stdin)
    argv = _peel(words, cmd)
    if not argv:
        return [cmd] if cmd.env or cmd.sudo else []
    cmd.argv = argv
    extra: list[Command] = []
    prog = cmd.prog
    if prog in SHELLS or prog == "su":
        script = next((argv[j + 1] for j, a in enumerate(argv[:-1])
                       if a == "-c" or (a.startswith("-") and not a.startswith("--") and "c" in a[1:])), None)
        if script is not None:
            extra = _nested(script, f"{prog} -c", depth, cmd.sudo)
        elif stdin:
            extra = _nested(stdin, f"| {prog}", depth, cmd.sudo)
    elif prog == "eval":
        extra = _nested(" ".join(argv[1:]), "eval", depth, cmd.sudo)
    elif prog == "alias":
        # `alias sudo='sudo rm -rf /'` arms a command for later: read what it would run.
        for op in argv[1:]:
            name, eq, body = op.partition("=")
            if eq:
                extra.extend(_nested(body, f"alias {name}", depth, cmd.sudo))
    elif prog == "ssh":
        ops = _ssh_operands(argv)
        if len(ops) > 1:
            extra = _nested(" ".join(ops[1:]), f"ssh {ops[0]}", depth, False)
    if "xargs" in cmd.via:
        cmd.via.remove("xargs")
        cmd.via.append("xargs")
    return [cmd, *extra]


_SSH_OPTARGS = set("bcDEeFIiJLlmOopQRSWw")


def _ssh_operands(argv: list[str]) -> list[str]:
    """ssh's destination and remote command words (options and their values skipped)."""
    out: list[str] = []
    i = 1
    while i < len(argv):
        a = argv[i]
        if not out and a.startswith("-") and len(a) > 1:
            i += 2 if (len(a) == 2 and a[1] in _SSH_OPTARGS) else 1
            continue
        out.append(a)
        i += 1
    return out


def _words(node: Any) -> list[str]:
    return [w.word for w in getattr(node, "parts", []) if getattr(w, "kind", "") == "word"]


def _walk(node: Any, line: str, out: list[Command], depth: int,
          piped_from: list[str] | None = None, stdin: str | None = None) -> None:
    kind = getattr(node, "kind", "")
    if kind == "pipeline":
        stages = [p for p in node.parts if getattr(p, "kind", "") != "pipe"]
        feed: str | None = None
        prev: list[str] = []
        for k, p in enumerate(stages):
            before = len(out)
            _walk(p, line, out, depth, prev, feed)
            stage_words = _words(p)
            nxt = _words(stages[k + 1]) if k + 1 < len(stages) else []
            if nxt and len(out) > before and posixpath.basename(nxt[0]) in _INTERPRETERS:
                out[before].piped_to_shell = True
            # What `echo …` or `printf …` prints is known: it becomes the next stage's stdin.
            feed = " ".join(stage_words[1:]) if stage_words[:1] in (["echo"], ["printf"]) else None
            prev = stage_words
        return
    if kind == "command":
        words: list[str] = []
        redirects: list[tuple[str, str]] = []
        for p in node.parts:
            pk = getattr(p, "kind", "")
            if pk in ("word", "assignment"):
                words.append(p.word)
                for sub in getattr(p, "parts", []) or []:
                    _walk(sub, line, out, depth)
            elif pk == "redirect":
                target = p.output
                tword = str(target) if isinstance(target, int) else str(getattr(target, "word", None))
                redirects.append((str(p.type), tword))
                if p.type == "<<<":
                    stdin = tword
                elif p.type in ("<<", "<<-") and getattr(p, "heredoc", None) is not None:
                    body = str(p.heredoc.value)
                    stdin = body.rsplit("\n", 1)[0] if "\n" in body else body
        text = line[node.pos[0]: node.pos[1]]
        out.extend(_command(words, redirects, text, depth, piped_from or [], stdin))
        return
    if kind in ("commandsubstitution", "processsubstitution"):
        before = len(out)
        _walk(node.command, line, out, depth)
        for c in out[before:]:
            c.via = ["$(…)", *c.via]
        return
    for attr in ("parts", "list"):
        for p in getattr(node, attr, []) or []:
            _walk(p, line, out, depth, piped_from, stdin)
    sub = getattr(node, "command", None)
    if sub is not None and kind != "word":
        _walk(sub, line, out, depth)


# --- destructive operations ---------------------------------------------------------------------
SCRATCH_RE = re.compile(
    r"(^|/)(build|dist|out|target|coverage|htmlcov|node_modules|__pycache__|\.pytest_cache|\.mypy_cache"
    r"|\.ruff_cache|\.cache|cache|caches|\.tox|\.nox|\.next|\.nuxt|\.parcel-cache|\.gradle|tmp|temp|\.tmp"
    r"|\.venv|venv|env|\.eggs|[\w.-]+\.egg-info|logs?)(/.*)?$|^/tmp(/.*)?$|^/var/tmp(/.*)?$|\.(pyc|pyo|o|log|tmp|bak|swp)$")
CATASTROPHIC_RE = re.compile(
    r"^(/|/\*|~|~/|~/\*|\$HOME|\$HOME/|\$HOME/\*|\$\{HOME\}|\.|\./|\*|\./\*|\.\.|\.\./|/home|/home/\w+|/root"
    r"|/(usr|etc|var|bin|sbin|lib|lib64|boot|opt|srv|dev|proc|sys|mnt)(/)?(\*)?|/\$\w+|/\$\{\w+\})/?$")
# Files under these are the system's, not the task's: removing one is destructive even without -r.
SYSTEM_PATH_RE = re.compile(r"^/(etc|usr|bin|sbin|lib|lib64|boot|root|var/lib|var/db|var/backups)/")


def is_scratch(target: str) -> bool:
    """Build output, caches, virtualenvs, logs and temp dirs: safe to delete and regenerate."""
    norm = posixpath.normpath(target.strip("'\""))
    return not norm.startswith("..") and bool(SCRATCH_RE.search(norm))


def is_catastrophic(target: str) -> bool:
    """A root, home, system or whole-working-tree target that no request makes safe to wipe."""
    return bool(CATASTROPHIC_RE.match(target.strip("'\"")))


def _lost(targets: list[str]) -> list[str]:
    """The targets whose loss matters (scratch left out, catastrophic ones always kept)."""
    return [t for t in targets if is_catastrophic(t) or not is_scratch(t)]


def _find_patterns(argv: list[str]) -> list[str]:
    """The names `find` selects (`-name '*.pyc'` → ".pyc"), globs stripped so that they can be
    compared with scratch names and with what the user asked to delete."""
    pats = [argv[j + 1] for j, a in enumerate(argv[:-1]) if a in ("-name", "-iname", "-path", "-ipath", "-regex")]
    return [p for p in (re.sub(r"[*?\[\]^$\\]|\.\*", "", p) for p in pats) if p.strip("./")]


_MONGO_DROP = re.compile(r"\.(drop|dropDatabase)\(\s*\)|\.(deleteMany|remove)\(\s*\{\s*\}\s*\)")


def command_destroys(cmd: Command) -> tuple[str, list[str]] | None:
    """(why, targets) when a command destroys data it cannot get back; None otherwise.

    Deleting scratch (build output, caches, `node_modules`, `/tmp/…`) is not destructive."""
    hit = _destroys(cmd)
    if hit is None:
        return None
    why, targets = hit
    if targets and not _lost(targets):
        return None
    return why, targets


def _destroys(cmd: Command) -> tuple[str, list[str]] | None:
    prog, flags, ops = cmd.prog, cmd.flags(), cmd.operands()
    if prog == "rm" and "xargs" in cmd.via and all(o == "{}" for o in ops):
        fed = _find_patterns(cmd.piped_from) if cmd.piped_from[:1] == ["find"] else []
        return "bulk delete through xargs", fed or ["(piped file list)"]
    if prog == "rm" and ({"r", "R", "--recursive"} & flags or any(is_catastrophic(o) or SYSTEM_PATH_RE.match(o) for o in ops)):
        return "recursive delete" if {"r", "R", "--recursive"} & flags else "system file delete", ops
    if prog == "find" and ("-delete" in cmd.argv or any(posixpath.basename(a) == "rm" for a in cmd.argv)):
        return "find … -delete", _find_patterns(cmd.argv) or cmd.argv[1:2]
    if prog in ("shred", "wipefs") or prog.startswith("mkfs"):
        return prog, ops
    if prog == "dd" and any(a.startswith("of=/dev/") for a in cmd.argv):
        return "dd onto a device", [a for a in cmd.argv if a.startswith("of=")]
    if prog == "git" and ops:
        sub = ops[0]
        if sub == "push" and ({"f", "--force", "--force-with-lease", "--mirror", "--delete"} & flags or any(o.startswith("+") for o in ops[1:])):
            return "git force-push", ops[1:] or ["(remote branch)"]
        if sub == "reset" and "--hard" in flags:
            return "git reset --hard", ["(uncommitted changes)"]
        if sub == "clean" and "f" in flags:
            return "git clean -f", ops[1:] or ["(untracked files)"]
        if sub in ("checkout", "restore") and ("." in ops[1:] or ("--" in cmd.argv and "." in cmd.argv)):
            return "discard all working-tree changes", ["(working-tree changes)"]
        if sub == "branch" and "D" in flags:
            return "force-delete branch", ops[1:]
    if prog in ("dropdb", "dropuser"):
        return prog, ops
    if prog == "redis-cli" and any(o.lower() in ("flushall", "flushdb") for o in ops):
        return "redis flush", ops
    if prog in ("mongo", "mongosh") and _MONGO_DROP.search(" ".join(cmd.argv[1:])):
        return "mongo drop", ops
    if prog == "kubectl" and ops[:1] == ["delete"]:
        return "kubectl delete", ops[1:]
    if prog == "terraform" and ops[:1] == ["destroy"]:
        return "terraform destroy", ops[1:] or ["(infrastructure)"]
    if prog == "docker" and (ops[:2] in (["system", "prune"], ["volume", "rm"], ["volume", "prune"]) or (ops[:1] == ["rmi"] and "f" in flags)):
        return "docker prune/remove", ops
    if prog == "truncate" and any(a in ("-s0", "0") for a in cmd.argv) and ops:
        return "truncate to zero", ops
    return None


# --- network and privileges ---------------------------------------------------------------------
_UPLOAD_FLAGS = {"-d", "--data", "--data-binary", "--data-raw", "--data-urlencode", "-F", "--form",
                 "-T", "--upload-file", "--post-file", "--post-data", "--json"}


def command_uploads(cmd: Command) -> bool:
    """Whether a command sends local data to another host (upload flags, scp/rsync to host:path, nc)."""
    prog = cmd.prog
    if prog in ("curl", "wget", "http", "https"):
        return any(a.split("=")[0] in _UPLOAD_FLAGS or (a.startswith("-d") and len(a) > 2) or a in ("-XPOST", "-XPUT")
                   for a in cmd.argv) or bool(re.search(r"(-X|--request)\s*(POST|PUT|PATCH)", cmd.text))
    if prog in ("scp", "rsync", "sftp"):
        return any(re.match(r"^[\w.-]*@?[\w.-]+:", o) for o in cmd.operands()[-1:])
    if prog in ("nc", "ncat", "netcat", "telnet"):
        return True
    if prog in ("aws", "gsutil") and any(o in ("cp", "sync", "mv") for o in cmd.operands()[:2]):
        return any(o.startswith(("s3://", "gs://")) for o in cmd.operands()[-1:])
    return False


def command_hosts(cmd: Command) -> list[str]:
    """Remote hosts a command addresses (URLs, user@host, host:path, nc host)."""
    hosts = [url_host(u) for a in cmd.argv for u in URL_RE.findall(a)]
    if cmd.prog in ("scp", "rsync", "sftp"):
        for o in cmd.operands():
            m = re.match(r"^(?:[\w.-]+@)?([\w.-]+):", o)
            if m:
                hosts.append(m.group(1).lower())
    if cmd.prog == "ssh":
        ops = _ssh_operands(cmd.argv)
        if ops:
            hosts.append(ops[0].split("@")[-1].lower())
    if cmd.prog in ("nc", "ncat", "netcat", "telnet") and cmd.operands():
        hosts.append(cmd.operands()[0].lower())
    return [h for h in hosts if h]


PRIV_PROGS = frozenset({"su", "visudo", "usermod", "useradd", "passwd", "chpasswd", "setenforce", "ufw", "iptables"})


def command_escalates(cmd: Command) -> str | None:
    """Why a command changes privileges or access control, or None."""
    if cmd.sudo:
        return f"sudo {cmd.prog}" + (f" as {cmd.sudo_user}" if cmd.sudo_user else "")
    prog, flags, ops = cmd.prog, cmd.flags(), cmd.operands()
    if prog == "chmod" and ops:
        mode = ops[0]
        if re.fullmatch(r"0?[0-7]?7[0-7]7|0?777", mode) or re.search(r"(^|,)[augo]*\+[rwx]*s|o\+[rwx]*w|a\+[rwx]*w|^\+s", mode):
            return f"chmod {mode}"
    if prog == "chown" and ops and ops[0].split(":")[0] == "root":
        return "chown root"
    if prog == "usermod" and ({"a", "G"} & flags) and any(g in ("sudo", "wheel", "admin", "root", "docker") for o in ops for g in o.split(",")):
        return "add user to an admin group"
    if prog in ("visudo", "setenforce", "chpasswd", "passwd"):
        return prog
    if (prog == "ufw" and ops[:1] == ["disable"]) or (prog == "iptables" and "F" in flags):
        return "firewall disabled"
    return None
