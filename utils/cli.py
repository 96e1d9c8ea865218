"""What every stage script does at its edges: read settings, turn bad input into one sentence."""

import sys

import torch

import config


class UserError(Exception):
    """Bad input from the user (a file, a setting, an entry): the message says which and what to do."""


def run_stage(main, used_settings):
    """Call main(settings) with the command line's settings; bad input exits with one line, not a traceback."""
    try:
        settings = config.parse(sys.argv[1:], used_settings)
        main(settings)
    except (UserError, config.SettingsError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except torch.OutOfMemoryError as error:
        print(f"error: the GPU ran out of memory ({str(error).splitlines()[0]}). Lower generate_batch_size or "
              f"train_sample_batch_size, or height and width; train_timesteps_per_call=0 and "
              f"train_gradient_checkpointing=auto make training fit by themselves. Everything saved so far is kept.",
              file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted: everything saved so far is kept; run the same command again to go on.", file=sys.stderr)
        sys.exit(130)
