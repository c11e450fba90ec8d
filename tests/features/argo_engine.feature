Feature: Run applications on Argo Workflows
  Where a site outgrows one machine, MWM runs its applications as Argo workflows on Kubernetes. Here a
  real Argo Server and workflow-controller run them on fake (kwok) nodes; what the application's
  container would write, Argo's executor stand-in copies from its input.

  Scenario: A study runs on Argo and its results reach the receiver
    Given a DICOM receiver "PACS" is listening
    And MWM is running with the Argo application "echo" on the AE title "MWM-ARGO" exporting to "PACS"
    When the modality "CT-SCANNER" sends 1 CT studies of 2 series each to "MWM-ARGO"
    Then 1 jobs of "echo" succeed, one per StudyInstanceUID
    And the receiver "PACS" gets the 6 images of that study back
