"""What every data source shares: errors and the batch-size arithmetic."""

from vmoe.data import preprocess_config


class DataError(ValueError):
  """Bad dataset config or unreadable data; the message is one line naming
  the config field or the file."""


class DatasetNotFoundError(DataError):
  """A dataset is unknown or not prepared in `data_dir` (one-line message)."""


def local_batch(global_batch: int, process_count: int, field: str) -> int:
  """This process's share of a global batch size (DataError naming `field`
  unless it divides)."""
  if not isinstance(global_batch, int) or global_batch <= 0:
    raise DataError(f'{field}={global_batch!r} must be a positive integer')
  if global_batch % process_count:
    raise DataError(f'{field}={global_batch} is not divisible by the number '
                    f'of processes ({process_count})')
  return global_batch // process_count


def check_process(process_index: int, process_count: int) -> None:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in '
                     f'[0, process_count={process_count})')


def check_preprocess(pp) -> None:
  """Validates config.preprocess before any work (one-line DataError)."""
  try:
    preprocess_config.check_preprocess(pp)
  except ValueError as e:
    raise DataError(str(e)) from None
