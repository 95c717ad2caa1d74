"""Reading DICOM: files and zips to checked series and volumes; every series passes the input gate."""
