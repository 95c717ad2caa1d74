"""Every byte of I/O, in layers along the data path (each imports only the ones listed before it):

- ``core``: settings, PHI-safe logging, UID generation, site plugins
- ``reading``: DICOM files and zips to checked series and volumes (the input gate)
- ``writers``: step outputs to DICOM derived objects (series, SEG, SR, Encapsulated STL)
- ``processing``: rules file, running a rule's steps on a series, ``sprim run``
- ``archives``: where studies live (folder, DICOMweb, DIMSE)
- ``ingest``: how studies arrive (change feed, C-STORE listener)
- ``platform``: job store, submission, execution, leases, dispatch, reprocessing
- ``interfaces``: the ``sprim`` CLI and the REST API
"""
