from opsbay_mqtt.cli import main

main()
