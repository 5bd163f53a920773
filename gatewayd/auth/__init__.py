"""Factor verification and attempt limits. Pure: time is passed in, state is passed in and returned."""
