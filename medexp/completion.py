"""``medexp completion bash|zsh``: tab completion of the ``medexp`` command.

The printed script registers a completion function for ``medexp``::

    eval "$(medexp completion bash)"      # in ~/.bashrc; zsh: eval "$(medexp completion zsh)"

On every TAB the shell runs ``medexp completion query`` with the line in ``COMP_LINE`` (and
``COMP_POINT``, ``COMP_WORDBREAKS``), which prints one candidate a line: the commands after
``medexp``; after ``medexp <command>`` of a Hydra command, what Hydra's own completion offers for
that command's config (``conf/<command>.yaml``): config groups (``model=``), their options
(``model=resnet18``), keys (``trainer.max_epochs=``) and their current values, files after
``key=./``. Commands with their own arguments (``reproduce``, ``summarize``) complete file names.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from medexp.cli import COMMANDS, hydra_command

SHELLS = ("bash", "zsh")
# what a Hydra command takes besides overrides (see `medexp train --hydra-help`)
HYDRA_FLAGS = ("--help", "--verbose", "--multirun", "--cfg", "--resolve", "--info", "--hydra-help")

BASH = r"""# tab completion of medexp (bash): eval "$(medexp completion bash)"
_medexp_completion() {
    local IFS=$'\n'
    COMPREPLY=($(COMP_LINE="$COMP_LINE" COMP_POINT="$COMP_POINT" COMP_WORDBREAKS="$COMP_WORDBREAKS" \
        "${COMP_WORDS[@]:0:1}" completion query 2>/dev/null))
    # a group, a key's parent or a folder: go on typing right after it
    if [[ ${#COMPREPLY[@]} -eq 1 && ${COMPREPLY[0]} == *[=./] ]] && type compopt &>/dev/null; then
        compopt -o nospace
    fi
}
complete -o default -F _medexp_completion medexp
"""

# zsh: a completion function of its own (compsys), the same query with the whole line; groups,
# keys and folders (`model=`, `trainer.`, `data/`) take no space after them
ZSH = r"""# tab completion of medexp (zsh): eval "$(medexp completion zsh)"
(( $+functions[compdef] )) || { autoload -U +X compinit && compinit; }
_medexp_completion() {
    local -a candidates spaced unspaced
    local candidate
    candidates=(${(f)"$(COMP_LINE="$BUFFER" COMP_POINT="$CURSOR" ${words[1]} completion query 2>/dev/null)"})
    for candidate in $candidates; do
        if [[ $candidate == *[=./] ]]; then unspaced+=($candidate); else spaced+=($candidate); fi
    done
    (( $#unspaced )) && compadd -Q -S '' -- $unspaced
    (( $#spaced )) && compadd -Q -- $spaced
    (( $#candidates )) || _files
}
compdef _medexp_completion medexp
"""


def script(shell: str) -> str:
    """The script that registers ``medexp``'s completion in ``shell``."""
    return {"bash": BASH, "zsh": ZSH}[shell]


def query(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The candidates for the word at the cursor of ``COMP_LINE`` (up to ``COMP_POINT``), each
    cut after the last of ``COMP_WORDBREAKS`` in that word, as the shell replaces only that part.
    Empty when nothing applies (the shell then completes file names)."""
    line = environ.get("COMP_LINE", "")
    try:
        line = line[: int(environ.get("COMP_POINT", len(line)))]
    except ValueError:
        pass
    words = line.split()
    if not words or line[-1].isspace():
        words.append("")
    word, arguments = words[-1], words[1:]  # words[0]: the program
    if len(arguments) <= 1:
        candidates = [name for name in [*COMMANDS, "--help", "--version"] if name.startswith(word)]
    else:
        candidates = _command_candidates(arguments[0], arguments[1:])
    cut = max((word.rfind(char) for char in environ.get("COMP_WORDBREAKS", "") if not char.isspace()), default=-1) + 1
    return [candidate[cut:] for candidate in candidates if candidate.startswith(word[:cut])]


def _command_candidates(command: str, arguments: list[str]) -> list[str]:
    """Candidates for the last of ``arguments`` (the word being typed) after ``medexp <command>``."""
    word = arguments[-1]
    if command == "completion":
        return [shell for shell in SHELLS if shell.startswith(word)] if len(arguments) == 1 else []
    if not hydra_command(command):
        return []  # reproduce, summarize: a run directory or a file
    if word.startswith("-") and "=" not in word:
        return [flag for flag in HYDRA_FLAGS if flag.startswith(word)]
    overrides = [argument for argument in arguments if argument != "--verbose"]
    try:
        return _hydra_candidates(command, overrides)
    except Exception:  # noqa: BLE001 - a half-typed line may not compose; a completion never prints a traceback
        return []


def _hydra_candidates(command: str, overrides: list[str]) -> list[str]:
    """Hydra's completion (its bash plugin's query, which ``-sc query=bash`` runs) over the
    command's config, with the overrides typed before the last word composed in."""
    from hydra import initialize_config_module
    from hydra._internal.core_plugins.bash_completion import BashCompletion
    from hydra.core.global_hydra import GlobalHydra

    from hydra_plugins.medexp import register_plugins
    from medexp.resolvers import register_resolvers

    register_resolvers()  # values shown after `key=` may interpolate ${medmnist:...}
    register_plugins()  # hparams_search=optuna names medexp's sweeper
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="medexp.conf", job_name=command, version_base="1.3"):
        plugin = BashCompletion(GlobalHydra.instance().config_loader())
        # its query() reads COMP_LINE and strips one program name; the line after the command is ours
        return plugin._query(config_name=command, line=" ".join(overrides))


def main(arguments: list[str]) -> None:
    usage = 'usage: medexp completion {bash,zsh}   (in ~/.bashrc: eval "$(medexp completion bash)")'
    if arguments in (["-h"], ["--help"]):
        print(usage)
    elif arguments == ["query"]:
        print("\n".join(query()))
    elif len(arguments) == 1 and arguments[0] in SHELLS:
        print(script(arguments[0]), end="")
    else:
        print(f"medexp: error: expected one shell of {list(SHELLS)}, got {arguments}\n{usage}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
