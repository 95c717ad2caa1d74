"""The job platform: job store, submission and routing, execution with leases, dispatch, reprocessing."""
