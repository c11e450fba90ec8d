"""Test, demo and benchmark helpers: synthetic DICOM studies and real DICOM peers (dcmtk, Orthanc)."""
