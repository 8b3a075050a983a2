"""`vitpose` command line: one subcommand per stage.

Each command module exposes `register(subparsers)` which adds its parser and sets
`func=<callable(args) -> int>`; the modules are imported lazily so `vitpose --help` stays fast and
`vitpose predict` does not pay for importing Ray.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
import threading

# subcommand name -> module providing `register(subparsers)`
COMMANDS: dict[str, str] = {
    # the stages, each a package with its config, run function, spec and command
    "shard": "pipelines.shard.command",
    "detect": "pipelines.detect.command",
    "pretrain": "pipelines.pretrain.command",
    "finetune": "pipelines.finetune.command",
    "tune": "pipelines.tune.command",
    "distill": "pipelines.distill.command",
    "register": "pipelines.register.command",
    "serve": "pipelines.serve.command",
    # the pipeline and the tools around it
    "run": "pipelines.commands.run",
    "plan": "pipelines.commands.plan",
    "synth": "pipelines.commands.synth",
    "predict": "pipelines.commands.predict",
    "infer": "pipelines.commands.infer",
    "eval": "pipelines.commands.evaluate",
    "export": "pipelines.commands.export",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitpose", description="ViTPose on Ray: data -> train -> tune -> serve")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        if only is not None and name != only:
            # still list it in --help without importing its module
            subparsers.add_parser(name, help=f"(run `vitpose {name} --help`)")
            continue
        importlib.import_module(module_name).register(subparsers)  # a broken command fails loudly
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except Exception as error:
        # user errors (bad config, file, checkpoint, URI, device, server) print one clear line and exit 2;
        # anything else is a bug and keeps its traceback. -v shows the traceback of user errors too.
        message = user_error_message(error)
        if message is None or args.verbose:
            raise
        print(f"vitpose {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM/SIGHUP once Ray is up (pipelines.session)
        import signal

        from pipelines import session

        session.interrupt_taken()
        # stopped: a late or repeated interrupt during exit (atexit hooks) must not turn exit 130 into death
        # by SIGINT (-2) after the message below
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        reason = f"stopped by signal {session.STOPPED_BY}" if session.STOPPED_BY else str(interrupt) or "interrupted"
        print(f"vitpose {args.command}: {reason}; run the same command again to resume", file=sys.stderr)
        return 130


# what Ray Data appends to the message of a task's error ("Failed to apply UDF transform after 1/1 attempts ...
# configure DataContext ..."): advice about its own retries, beside the point for a user error (S3 retries
# are the S3 client's, see pipelines.storage)
RAY_DATA_RETRY_NOTE = re.compile(r"\nFailed to [^\n]* after \d+/\d+ attempts \(total backoff [\d.]+s\)\..*\Z", re.S)


def user_error_message(error: BaseException) -> str | None:
    """The message of a user error (one line; a config's list of bad keys, one per line), or None for a bug.

    User errors are `UserError`s (also found inside Ray's task-error wrappers), the ValueErrors the
    stages raise on bad input (configs, checkpoints, argument checks) and OSErrors (files, network:
    requests' connection errors are OSErrors too).
    """
    from vitpose_core.errors import find_user_error

    found = find_user_error(error)
    if found is not None:
        error = found
    elif not isinstance(error, ValueError | OSError):
        return None
    message = RAY_DATA_RETRY_NOTE.sub("", str(error)).strip() or type(error).__name__
    filename = getattr(error, "filename", None)
    if isinstance(error, OSError) and filename and str(filename) not in message:
        message = f"{filename}: {message}"
    return message


if __name__ == "__main__":
    sys.exit(main())
