Feature: Deploy and set up an application
  An operator makes an AI application available to a modality: a DICOM sink for its results, the
  application itself, and the AE title the modality sends to, all through the mwm command line.

  Scenario: Register an application, a sink and an AE title with the CLI
    Given MWM's API is running
    When I create the DICOM sink "pacs" for the AE title "PACS" on port 11112 with the CLI
    And I register the example application "mip" exporting to "pacs" with the CLI
    And I map the AE title "MWM-MIP" to "mip" allowing the caller "CT-SCANNER" with the CLI
    Then the CLI lists the application "mip" at revision 1 with the sink "pacs"
    And the CLI lists the sink "pacs" for the AE title "PACS"
    And the CLI lists the AE title "MWM-MIP" triggering "mip"
