from opsbay_mqtt.cli.app import main

main()
