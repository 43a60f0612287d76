/*
 * The EICAR anti-virus test file (https://www.eicar.org/download-anti-malware-testfile/).
 * Written in hex so this rule file is not itself the test string. The gateway's start-up
 * self-test requires this rule to match: a scanner that does not find EICAR refuses to run.
 * It matches anywhere in a decoded object (not only at offset 0, as scanners usually do):
 * members, parts and attachments are scanned after decoding, and a gateway would rather
 * refuse a document that quotes the test string than let the string through.
 */
rule EICAR_Test_File
{
    meta:
        description = "EICAR anti-virus test file"
        reference = "https://www.eicar.org/"
    strings:
        $eicar = {
            58 35 4F 21 50 25 40 41 50 5B 34 5C 50 5A 58 35 34 28 50 5E 29 37 43 43 29 37 7D 24
            45 49 43 41 52 2D 53 54 41 4E 44 41 52 44 2D 41 4E 54 49 56 49 52 55 53 2D 54 45 53
            54 2D 46 49 4C 45 21 24 48 2B 48 2A
        }
    condition:
        $eicar
}
