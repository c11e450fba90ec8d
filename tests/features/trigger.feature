Feature: Trigger jobs from DICOM studies
  Files sent to the gateway are grouped by StudyInstanceUID into one bucket per study; each bucket
  becomes one job of the application.

  Scenario: Two studies become two jobs
    Given MWM is running with the example application "mip" on the AE title "MWM-MIP"
    When the modality "CT-SCANNER" sends 2 CT studies of 2 series each to "MWM-MIP"
    Then 2 jobs of "mip" succeed, one per StudyInstanceUID
    And each job's outputs hold one MIP per series
