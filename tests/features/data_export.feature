Feature: Export results to DICOM destinations
  Results reach PACS either pushed by MWM's DICOM sink or pulled by an export client through the
  Export API.

  Scenario: The DICOM sink pushes the results to a receiver
    Given a DICOM receiver "PACS" is listening
    And MWM is running with the example application "mip" on the AE title "MWM-MIP" exporting to "PACS"
    When the modality "CT-SCANNER" sends 1 CT studies of 2 series each to "MWM-MIP"
    Then the receiver "PACS" gets 2 secondary captures of that study

  Scenario: A pull client exports the results through the Export API
    Given a DICOM receiver "PACS" is listening
    And MWM is running with the example application "mip" on the AE title "MWM-MIP" for the pull sink "ig"
    And the export client of "ig" is sending to "PACS"
    When the modality "CT-SCANNER" sends 1 CT studies of 2 series each to "MWM-MIP"
    Then the receiver "PACS" gets 2 secondary captures of that study
