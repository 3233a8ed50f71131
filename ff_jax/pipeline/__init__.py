"""The ForgetFilter job: its phases in order (`driver`), one module per phase or close group of
phases, the context they share (`context`), the run directory's layout and manifest (`layout`,
`rundir`) and the inputs a run reads (`inputs`)."""
